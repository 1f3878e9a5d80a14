"""Tokenizers (char, byte, trained BPE) that map text <-> int arrays and save themselves as JSON.

BPE is Hugging Face `tokenizers` byte-level BPE (GPT-2's scheme) rather than sentencepiece:
it starts from the 256 bytes, so any UTF-8 or even invalid byte string encodes with no unknown
token; it trains on a corpus in seconds from Python with no temp files or protobufs; and its
tokenizer.json is the format of Hugging Face checkpoints, so an imported model's tokenizer loads
through the same class (data.tokenizer=/path/to/tokenizer.json).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

KINDS = ("char", "byte", "bpe")
EOT_TOKEN = "<|endoftext|>"  # How an end-of-text id decodes, and the special token of a BPE.
# End-of-text tokens a loaded tokenizer.json may have, in the order they are looked for.
EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
INSTALL_HINT = "the bpe tokenizer needs Hugging Face tokenizers: pip install 'jaxlm[bpe]'"
MIN_BPE_VOCAB = 257  # The 256 byte symbols plus at least one merge.


class UnknownCharacters(JaxlmError):
  """Text with characters a char tokenizer's vocabulary lacks (`chars`, sorted)."""

  def __init__(self, chars: str):
    self.chars = chars
    super().__init__(f"text has {len(chars)} character(s) the char tokenizer does not know: "
                     f"{chars!r}")


def _hf_tokenizers():
  try:
    import tokenizers as hf_tokenizers
  except ImportError:
    raise JaxlmError(INSTALL_HINT) from None
  return hf_tokenizers


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab 256, round-trips any text and any byte string.

  With eot=True id 256 is a reserved end-of-text token (vocab 257): documents of a token store
  end with it, and no text encodes to it.
  """

  kind = "byte"

  def __init__(self, eot: bool = False):
    self.eot_id = 256 if eot else None
    self.vocab_size = 257 if eot else 256

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Any) -> str:
    ids = np.asarray(ids).reshape(-1)
    parts = np.split(ids, np.flatnonzero(ids == 256)) if self.eot_id else [ids]
    text = [bytes(p[p != 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")
            for p in parts]
    return EOT_TOKEN.join(text)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for end-of-text): the denominator of bits per byte."""
    return np.array([1] * 256 + [0] * (self.vocab_size - 256), dtype=np.int64)

  def to_json(self) -> dict[str, Any]:
    d = {"kind": self.kind, "vocab_size": self.vocab_size}
    if self.eot_id is not None:
      d["eot"] = True
    return d


class CharTokenizer:
  """One token per Unicode code point, vocab built from a corpus (sorted, as nanoGPT)."""

  kind = "char"

  def __init__(self, chars: str, eot: bool = False):
    if not chars:
      raise JaxlmError("char tokenizer needs a non-empty vocabulary")
    self.chars = "".join(sorted(set(chars)))
    # With eot=True the id after the characters is a reserved end-of-text token.
    self.eot_id = len(self.chars) if eot else None
    self.vocab_size = len(self.chars) + bool(eot)
    self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    return cls("".join(sorted(set(text))))

  def encode(self, text: str) -> np.ndarray:
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(self._codepoints, cps)
    ids = np.minimum(ids, len(self.chars) - 1)
    bad = self._codepoints[ids] != cps
    if bad.any():
      raise UnknownCharacters("".join(sorted({chr(c) for c in cps[bad]})))
    return ids.astype(np.int32)

  def decode(self, ids: Any) -> str:
    table = self.chars + EOT_TOKEN if self.eot_id is not None else self.chars
    n = len(self.chars)
    return "".join(table[i] if i < n else table[n:] for i in np.asarray(ids).reshape(-1).tolist())

  def token_bytes(self) -> np.ndarray:
    sizes = [len(c.encode("utf-8")) for c in self.chars]
    return np.array(sizes + [0] * (self.vocab_size - len(sizes)), dtype=np.int64)

  def to_json(self) -> dict[str, Any]:
    d = {"kind": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}
    if self.eot_id is not None:
      d["eot"] = True
    return d


class BpeTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE when trained here)."""

  kind = "bpe"

  def __init__(self, hf: Any):
    self.hf = hf
    self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
    # The first end-of-text token the vocabulary has, if any (None: cannot end documents).
    self.eot_id = next((i for t in EOT_CANDIDATES if (i := hf.token_to_id(t)) is not None),
                       None)

  @classmethod
  def train(cls, text: str | Iterable[str], vocab_size: int,
            eot: bool = False) -> BpeTokenizer:
    """Byte-level BPE learned from `text` (a string, or an iterator of texts, streamed);
    deterministic for the same text and vocab_size.

    With eot=True the vocabulary's last id is the special token <|endoftext|>.
    """
    if vocab_size < MIN_BPE_VOCAB:
      raise JaxlmError(f"data.vocab_size={vocab_size} is too small for byte-level BPE: it "
                       f"needs at least {MIN_BPE_VOCAB} (256 bytes + merges)")
    hf = _hf_tokenizers()
    tok = hf.Tokenizer(hf.models.BPE())
    # No prefix space: encode(a + b) then splits the way encode(a), encode(b) do at a newline.
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size - bool(eot), min_frequency=2, show_progress=False,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    # Lines as the training iterator: the trainer counts words per line, in one pass.
    texts = [text] if isinstance(text, str) else text
    tok.train_from_iterator((line for t in texts for line in t.splitlines(keepends=True)),
                            trainer=trainer)
    if eot:
      tok.add_special_tokens([EOT_TOKEN])
    return cls(tok)

  @classmethod
  def from_hf_json(cls, hf_json: str) -> BpeTokenizer:
    return cls(_hf_tokenizers().Tokenizer.from_str(hf_json))

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = decode_utf8(text, name="text for the bpe tokenizer")
    return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Many texts at once on every core (the Rust side runs them in parallel, GIL released)."""
    return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids: Any) -> str:
    # Ids that end inside a multi-byte character decode to U+FFFD rather than failing.
    return self.hf.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for; special tokens count 0 (they are not text)."""
    special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
    if isinstance(self.hf.decoder, _hf_tokenizers().decoders.ByteLevel):
      # A byte-level token is spelt with one printable character per byte.
      return np.array([0 if (t := self.hf.id_to_token(i)) is None or t in special else len(t)
                       for i in range(self.vocab_size)], dtype=np.int64)
    return np.array([0 if (t := self.hf.id_to_token(i)) is None or t in special else
                     len(self.hf.decode([i]).encode("utf-8")) for i in range(self.vocab_size)],
                    dtype=np.int64)

  def to_json(self) -> dict[str, Any]:
    # The Hugging Face tokenizer.json, whole, inside jaxlm's JSON.
    return {"kind": self.kind, "vocab_size": self.vocab_size,
            "hf": json.loads(self.hf.to_str())}


Tokenizer = ByteTokenizer | CharTokenizer | BpeTokenizer


def is_tokenizer_path(kind: str) -> bool:
  """data.tokenizer names a tokenizer.json file rather than a kind."""
  return kind not in KINDS and kind.endswith(".json")


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
  """Each text's ids; a BPE encodes them all in parallel, char and byte one by one (numpy)."""
  if isinstance(tokenizer, BpeTokenizer):
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
  return [tokenizer.encode(t) for t in texts]


def make_tokenizer(kind: str, corpus: bytes, vocab_size: int = 0) -> Tokenizer:
  """Builds a tokenizer of `kind` for `corpus` (char and bpe vocabularies come from it).

  `kind` may also be the path of a tokenizer.json (jaxlm's or Hugging Face's), loaded as is.
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer.from_text(decode_utf8(corpus))
  if kind == "bpe":
    return BpeTokenizer.train(decode_utf8(corpus), vocab_size)
  if is_tokenizer_path(kind):
    return load(kind)
  raise JaxlmError(f"unknown tokenizer {kind!r}: expected one of {', '.join(KINDS)} or the "
                   "path of a tokenizer.json")


def decode_utf8(corpus: bytes, name: str = "corpus") -> str:
  try:
    return corpus.decode("utf-8")
  except UnicodeDecodeError as e:
    raise JaxlmError(
        f"{name} is not valid UTF-8 (byte {e.start}); the char and bpe tokenizers need UTF-8 text, "
        "use --config.data.tokenizer=byte for arbitrary bytes") from None


def from_json(d: dict[str, Any]) -> Tokenizer:
  if not isinstance(d, dict):
    raise JaxlmError(f"a tokenizer JSON is an object (jaxlm's {{\"kind\": ...}} or a Hugging "
                     f"Face tokenizer.json), not a JSON {type(d).__name__}")
  kind = d.get("kind")
  if kind == "byte":
    return ByteTokenizer(eot=d.get("eot", False))
  if kind == "char":
    return CharTokenizer(d["chars"], eot=d.get("eot", False))
  if kind == "bpe":
    return BpeTokenizer.from_hf_json(json.dumps(d["hf"]))
  if kind is None and "model" in d:  # A Hugging Face tokenizer.json as is.
    try:
      return BpeTokenizer.from_hf_json(json.dumps(d))
    except Exception as e:  # tokenizers raises its own exception types.
      raise JaxlmError(f"not a valid Hugging Face tokenizer.json: {e}") from None
  raise JaxlmError(f"unknown tokenizer kind {kind!r} in tokenizer JSON")


def save(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
  """Writes tokenizer.json (a local path or gs:// URL)."""
  workdir_lib.write_text(path, json.dumps(tokenizer.to_json(), ensure_ascii=False))


def load(path: str | os.PathLike) -> Tokenizer:
  if not workdir_lib.path(path).is_file():
    raise JaxlmError(f"tokenizer file not found: {path}")
  try:
    d = json.loads(workdir_lib.read_text(path))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise JaxlmError(f"tokenizer file {path} is not JSON: {e}") from None
  try:
    return from_json(d)
  except JaxlmError as e:
    raise JaxlmError(f"tokenizer file {path}: {e}") from None
  except (KeyError, TypeError, ValueError) as e:  # A jaxlm kind with a missing or odd field.
    raise JaxlmError(f"tokenizer file {path} is malformed ({type(e).__name__}: {e}); "
                     "rewrite it or remove it to derive the tokenizer again") from None
