"""Tokenizers (char, byte) that map text <-> int arrays and save themselves as JSON."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from jaxlm.errors import JaxlmError

KINDS = ("char", "byte")


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab 256, round-trips any text and any byte string."""

  kind = "byte"
  vocab_size = 256

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Any) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

  def to_json(self) -> dict[str, Any]:
    return {"kind": self.kind, "vocab_size": self.vocab_size}


class CharTokenizer:
  """One token per Unicode code point, vocab built from a corpus (sorted, as nanoGPT)."""

  kind = "char"

  def __init__(self, chars: str):
    if not chars:
      raise JaxlmError("char tokenizer needs a non-empty vocabulary")
    self.chars = "".join(sorted(set(chars)))
    self.vocab_size = len(self.chars)
    self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    return cls("".join(sorted(set(text))))

  def encode(self, text: str) -> np.ndarray:
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(self._codepoints, cps)
    ids = np.minimum(ids, self.vocab_size - 1)
    bad = self._codepoints[ids] != cps
    if bad.any():
      unknown = sorted({chr(c) for c in cps[bad]})
      raise JaxlmError(
          f"text has {len(unknown)} character(s) the char tokenizer does not know: "
          f"{''.join(unknown)!r}")
    return ids.astype(np.int32)

  def decode(self, ids: Any) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).reshape(-1).tolist())

  def to_json(self) -> dict[str, Any]:
    return {"kind": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}


Tokenizer = ByteTokenizer | CharTokenizer


def make_tokenizer(kind: str, corpus: bytes) -> Tokenizer:
  """Builds a tokenizer of `kind` for `corpus` (the char vocab comes from the corpus)."""
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer.from_text(decode_utf8(corpus))
  raise JaxlmError(f"unknown tokenizer {kind!r}: expected one of {', '.join(KINDS)}")


def decode_utf8(corpus: bytes, name: str = "corpus") -> str:
  try:
    return corpus.decode("utf-8")
  except UnicodeDecodeError as e:
    raise JaxlmError(
        f"{name} is not valid UTF-8 (byte {e.start}); the char tokenizer needs UTF-8 text, "
        "use --config.data.tokenizer=byte for arbitrary bytes") from None


def from_json(d: dict[str, Any]) -> Tokenizer:
  kind = d.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer(d["chars"])
  raise JaxlmError(f"unknown tokenizer kind {kind!r} in tokenizer JSON")


def save(tokenizer: Tokenizer, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(tokenizer.to_json(), f, ensure_ascii=False)


def load(path: str) -> Tokenizer:
  with open(path, encoding="utf-8") as f:
    return from_json(json.load(f))
