"""Exported tokenizers: AutoTokenizer loads a BPE run's and encodes and decodes as jaxlm does."""

import json

import pytest
import transformers  # noqa: F401  (the hf extra; a missing package is an error, not a skip)

from jaxlm import hf_tokenizer, tokenizers

CORPUS = "ROMEO:\nWhat, ho! apothecary!\n\nJULIET:\nO happy dagger, this is thy sheath.\n" * 30
TEXTS = ["ROMEO:\nWhat, ho!", "  two  spaces . and ,tabs\t\n", "héllo 🤖", "a<|endoftext|>b"]


@pytest.mark.parametrize("eot", [True, False])
def test_a_bpe_tokenizer_loads_in_autotokenizer_and_agrees(tmp_path, eot):
  tok = tokenizers.BpeTokenizer.train(CORPUS, 300, eot=eot)
  assert hf_tokenizer.export(tok, str(tmp_path), block_size=64) == [
      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf.model_max_length == 64
  if eot:
    assert hf.eos_token == hf.bos_token == tokenizers.EOT_TOKEN
    assert hf.eos_token_id == hf.bos_token_id == tok.eot_id == 299
  else:
    assert hf.eos_token_id is None and hf.bos_token_id is None
  for text in TEXTS:
    ids = list(map(int, tok.encode(text)))
    assert hf.encode(text) == ids  # No bos or eos added around the text.
    assert hf.decode(ids) == tok.decode(ids)  # No clean-up of spaces.


def test_the_config_ids_are_the_end_of_text_token():
  tok = tokenizers.BpeTokenizer.train(CORPUS, 300, eot=True)
  assert hf_tokenizer.special_token_ids(tok) == {"bos_token_id": 299, "eos_token_id": 299}
  assert hf_tokenizer.special_token_ids(tokenizers.ByteTokenizer()) == {
      "bos_token_id": None, "eos_token_id": None}


@pytest.mark.parametrize("tok", [tokenizers.ByteTokenizer(), tokenizers.CharTokenizer("abc")],
                         ids=["byte", "char"])
def test_char_and_byte_tokenizers_are_not_exported_and_say_so(tmp_path, tok):
  assert hf_tokenizer.export(tok, str(tmp_path), block_size=64) == []
  assert list(tmp_path.iterdir()) == []
  note = hf_tokenizer.not_exported(tok)
  assert "\n" not in note and f"{tok.kind} tokenizer is not exported" in note
  assert "only BPE" in note


def test_the_files_are_json(tmp_path):
  hf_tokenizer.export(tokenizers.BpeTokenizer.train(CORPUS, 300, eot=True), str(tmp_path), 32)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert config["clean_up_tokenization_spaces"] is False
