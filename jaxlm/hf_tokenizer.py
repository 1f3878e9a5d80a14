"""A run's tokenizer as the files `transformers.AutoTokenizer.from_pretrained(DIR)` loads.

A BPE tokenizer is a Hugging Face `tokenizers` tokenizer already: its tokenizer.json is written
as is, beside a tokenizer_config.json naming the generic fast-tokenizer class. Its end-of-text
token (if it has one) becomes both the eos and the bos token: jaxlm conditions an empty context
and a document's first token on end-of-text, and lm-eval's Hugging Face backend conditions them
on the bos token (else eos), so the two score the same tokens. Nothing else is special: jaxlm
never adds tokens around a text, so neither may the exported tokenizer.

Char and byte tokenizers have no Hugging Face format; they are not exported (`export` says so).
"""

from __future__ import annotations

import json
import os

from jaxlm import tokenizers

CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = "special_tokens_map.json"


def eot_token(tokenizer: tokenizers.Tokenizer) -> str | None:
  """The text of the tokenizer's end-of-text token, or None."""
  if tokenizer.eot_id is None:
    return None
  if isinstance(tokenizer, tokenizers.BpeTokenizer):
    return tokenizer.hf.id_to_token(tokenizer.eot_id)
  return tokenizers.EOT_TOKEN


def special_token_ids(tokenizer: tokenizers.Tokenizer) -> dict[str, int | None]:
  """bos/eos ids for the exported config.json (the model's generation stops at eos)."""
  return {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}


def not_exported(tokenizer: tokenizers.Tokenizer) -> str:
  return (f"the run's {tokenizer.kind} tokenizer is not exported: only BPE tokenizers have a "
          "Hugging Face format (transformers.AutoTokenizer cannot load this directory)")


def export(tokenizer: tokenizers.Tokenizer, out_dir: str, block_size: int) -> list[str]:
  """Writes the tokenizer files into out_dir; the names written ([] for char and byte)."""
  if not isinstance(tokenizer, tokenizers.BpeTokenizer):
    return []
  tokenizer.hf.save(os.path.join(out_dir, "tokenizer.json"))
  eot = eot_token(tokenizer)
  special = {"eos_token": eot, "bos_token": eot} if eot is not None else {}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "model_max_length": block_size,
      # Decoding must give back jaxlm's text: no space clean-up (" ." stays " .").
      "clean_up_tokenization_spaces": False,
      "add_bos_token": False,
      "add_eos_token": False,
      **special,
  }
  _write_json(os.path.join(out_dir, CONFIG), config)
  _write_json(os.path.join(out_dir, SPECIAL_TOKENS), special)
  return ["tokenizer.json", CONFIG, SPECIAL_TOKENS]


def _write_json(path: str, value: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
