"""Text corpus -> cached flat token array -> host-local batches that are pure functions of the step.

The batch for step s is drawn from a counter-based stream keyed by (seed, stream, s), so any
process can compute any step's batch with no state: resuming needs only the step number, and a
multi-host run gives each process its own rows of the same global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.resources
import json
import lzma
import os
import tempfile
import zlib
from collections.abc import Callable

import numpy as np
from absl import logging

from jaxlm import tokenizers
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

SHIPPED_CORPUS = "tinyshakespeare.txt.xz"

# Independent random streams drawn from the same seed.
TRAIN_STREAM = 0
EVAL_TRAIN_STREAM = 1
EVAL_VAL_STREAM = 2


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tokenized corpus split into train and val token arrays."""
  train: np.ndarray
  val: np.ndarray
  tokenizer: tokenizers.Tokenizer
  source: str  # what was read: the glob/path, or the shipped corpus' name
  sha256: str  # of the raw corpus bytes

  # The interface training and evaluation read data through (corpus/batches.StoreData, the
  # data.sources form, has the same): a train batch by step, named evaluation batch functions.

  def summary(self) -> str:
    return (f"{self.source} | tokenizer {self.tokenizer.kind}, vocab {self.tokenizer.vocab_size}"
            f" | train {len(self.train):,} tokens, val {len(self.val):,} tokens")

  def train_batch(self, **kw) -> dict[str, np.ndarray]:
    return get_batch(self.train, stream=TRAIN_STREAM, **kw)

  def eval_sets(self) -> dict[str, Callable[..., dict[str, np.ndarray]]]:
    return {"train": functools.partial(get_batch, self.train, stream=EVAL_TRAIN_STREAM),
            "val": functools.partial(get_batch, self.val, stream=EVAL_VAL_STREAM)}

  def aliases(self) -> dict[str, str]:
    return {}

  def mixture(self, steps: int, batch_size: int) -> list[str]:
    del steps, batch_size  # One source: no mixture to report.
    return []


def read_corpus(path: str) -> tuple[bytes, str]:
  """Returns the raw bytes of `path` (a file or glob; '' = the shipped corpus) and its name."""
  if not path:
    ref = importlib.resources.files("jaxlm") / "corpora" / SHIPPED_CORPUS
    return lzma.decompress(ref.read_bytes()), f"shipped:{SHIPPED_CORPUS}"
  files = sorted(glob.glob(os.path.expanduser(path)))
  if not files:
    raise JaxlmError(f"corpus not found: no file matches data.path={path!r}")
  files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise JaxlmError(f"corpus not found: data.path={path!r} matches only directories")
  data = b"".join(_read_file(f) for f in files)
  if not data:
    raise JaxlmError(f"corpus is empty: data.path={path!r} ({len(files)} file(s), 0 bytes)")
  return data, path


def _read_file(path: str) -> bytes:
  if path.endswith(".xz"):
    return lzma.decompress(open(path, "rb").read())
  with open(path, "rb") as f:
    return f.read()


def default_cache_dir() -> str:
  return workdir_lib.cache_dir("tokens")


def load_dataset(path: str, tokenizer: str, *, val_fraction: float, block_size: int,
                 cache_dir: str = "", vocab_size: int = 0,
                 saved: tokenizers.Tokenizer | None = None) -> Dataset:
  """Reads, tokenizes (once, cached on disk) and splits a corpus; checks it fits the context.

  `tokenizer` is a kind (char | byte | bpe) or a tokenizer.json path; `vocab_size` is the
  target vocabulary of a bpe tokenizer trained on the corpus. `saved` (a resumed run's own
  tokenizer) encodes the corpus instead of one derived from it, whose ids could differ; a
  character it lacks raises tokenizers.UnknownCharacters.
  """
  if not 0.0 < val_fraction < 1.0:
    raise JaxlmError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  raw, source = read_corpus(path)
  digest = hashlib.sha256(raw).hexdigest()
  tokens, tok = _tokenize_cached(raw, digest, tokenizer, cache_dir or default_cache_dir(),
                                 name=source, vocab_size=vocab_size, saved=saved)
  n_val = int(len(tokens) * val_fraction)
  train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
  for split, arr in (("train", train), ("val", val)):
    if len(arr) < block_size + 1:
      raise JaxlmError(
          f"corpus too short: the {split} split has {len(arr)} tokens but model.block_size="
          f"{block_size} needs at least {block_size + 1} (corpus {source!r}: {len(tokens)} "
          f"tokens, val_fraction={val_fraction})")
  return Dataset(train=train, val=val, tokenizer=tok, source=source, sha256=digest)


def _tokenize_cached(raw: bytes, digest: str, kind: str, cache_dir: str, name: str,
                     vocab_size: int = 0, saved: tokenizers.Tokenizer | None = None
                     ) -> tuple[np.ndarray, tokenizers.Tokenizer]:
  """Flat token array cached as raw uint16/uint32 plus a JSON sidecar (no pickle).

  A trained BPE tokenizer lives in the sidecar too, so it is trained once per (corpus,
  vocab size); a tokenizer file is keyed by a hash of its contents.
  """
  tag = kind
  if saved is not None:  # Keyed by the tokenizer itself: the same corpus, other ids.
    tag = "run-" + hashlib.sha256(json.dumps(saved.to_json(), sort_keys=True).encode(
        "utf-8")).hexdigest()[:16]
  elif kind == "bpe":
    tag = f"bpe{vocab_size}"
  elif tokenizers.is_tokenizer_path(kind):
    try:
      # A tokenizer.json may live in a gs:// workdir (one imported by jaxlm convert).
      tag = "file-" + hashlib.sha256(workdir_lib.path(kind).read_bytes()).hexdigest()[:16]
    except OSError:
      raise JaxlmError(f"tokenizer file not found: data.tokenizer={kind!r}") from None
  stem = os.path.join(cache_dir, f"{digest[:24]}.{tag}")
  meta_path, bin_path = stem + ".json", stem + ".bin"
  if os.path.exists(meta_path) and os.path.exists(bin_path):
    try:
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
      dtype = np.dtype(meta["dtype"])
      size = meta["n_tokens"] * dtype.itemsize
      if meta["sha256"] == digest and os.path.getsize(bin_path) == size:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        # The corpus hash and the size say which corpus the file was made from, not that its
        # bytes are still those tokens: a flipped or overwritten block keeps the size.
        if meta.get("tokens_crc32") == tokens_checksum(tokens):
          return tokens, tokenizers.from_json(meta["tokenizer"])
        if "tokens_crc32" in meta:  # (An entry from before the checksum is rebuilt quietly.)
          logging.warning("token cache %s fails its checksum (damaged): rebuilding it", bin_path)
    except (OSError, ValueError, KeyError):
      pass  # A damaged cache entry is simply rebuilt below.
  if saved is not None:
    tok = saved
    ids = tok.encode(raw if tok.kind == "byte" else
                     tokenizers.decode_utf8(raw, name=f"corpus {name!r}"))
  elif kind == "char":
    tok = tokenizers.make_tokenizer(kind, raw)
    ids = tok.encode(tokenizers.decode_utf8(raw, name=f"corpus {name!r}"))
  elif kind == "byte":
    tok = tokenizers.make_tokenizer(kind, raw)
    ids = tok.encode(raw)
  else:
    text = tokenizers.decode_utf8(raw, name=f"corpus {name!r}")
    tok = tokenizers.make_tokenizer(kind, raw, vocab_size)
    ids = tok.encode(text)
  dtype = np.dtype(np.uint16 if tok.vocab_size < 2**16 else np.uint32)
  tokens = ids.astype(dtype)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_write(bin_path, tokens.tobytes())
    meta = {"sha256": digest, "source": name, "n_tokens": int(len(tokens)), "dtype": dtype.name,
            "tokens_crc32": tokens_checksum(tokens), "tokenizer": tok.to_json()}
    _atomic_write(meta_path, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
  except OSError:
    pass  # An unwritable cache only costs re-tokenizing next time.
  return tokens, tok


def tokens_checksum(tokens: np.ndarray) -> int:
  """CRC-32 of the token array's bytes: fast enough to check at every load (it reads the
  whole file once, as training's random windows soon would), unlike a cryptographic hash."""
  return zlib.crc32(memoryview(np.ascontiguousarray(tokens)).cast("B"))


def _atomic_write(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, block_size: int,
              stream: int = TRAIN_STREAM, process_index: int = 0,
              process_count: int = 1) -> dict[str, np.ndarray]:
  """This process' rows of the global batch for `step`: random windows of block_size + 1 tokens.

  Pure in (seed, stream, step, process_index, process_count): the global batch does not
  depend on how many processes share it.

  Returns:
    {"inputs": int32[b, block_size], "targets": int32[b, block_size]} with
    b = batch_size // process_count.
  """
  if batch_size % process_count:
    raise JaxlmError(f"train.batch_size={batch_size} is not divisible by the {process_count} "
                     "processes")
  rng = np.random.default_rng([seed, stream, step])
  starts_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
  per_host = batch_size // process_count
  starts_b = starts_B[process_index * per_host:(process_index + 1) * per_host]
  window_bxL = np.asarray(tokens)[starts_b[:, None] + np.arange(block_size + 1)]
  window_bxL = window_bxL.astype(np.int32)
  return {"inputs": window_bxL[:, :-1], "targets": window_bxL[:, 1:]}
