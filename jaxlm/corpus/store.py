"""A sharded token store on disk: its format, and reading it (store_writer.py writes it).

A store is one directory (no pickle anywhere):

- `tokens-NNNNN.bin`: the tokens of consecutive whole documents, raw little-endian `uint16`
  when `vocab_size <= 65536`, else `uint32`. A shard is closed after the document that makes
  it reach `shard_tokens` tokens (so shards hold at least `shard_tokens` tokens, except the
  last, and no document is split): shard boundaries depend only on the document sequence.
- `tokens-NNNNN.idx`: raw little-endian int64, shape (documents, 3), one row per document of
  the shard: (start offset in the shard's tokens, source index, bytes of text).
- `manifest.json`, written last (its presence means the store is complete):
  `format` ("jaxlm-token-store"), `format_version` (1), `dtype` ("uint16" | "uint32", little
  endian), `vocab_size`, `eot_id`, `shard_tokens`, `tokenizer` (the caller's dict),
  `sources` (in order: name, fingerprint, documents, tokens, text_bytes), `totals`
  (documents, tokens, text_bytes) and `shards` (in order: name, documents, tokens, and the
  sha256 of the .bin and of the .idx file). No timestamps: the same input gives the same bytes.
- `writer.json` exists only while a write is unfinished: the header (everything in the
  manifest that the caller chose) that a resuming writer must match.

Writing: the shard in flight is appended to `tokens-NNNNN.bin.partial`; when it is full its
index goes to `tokens-NNNNN.idx.partial`, both are fsynced, the .bin is renamed into place,
then the .idx (so an .idx marks a complete shard), then the directory is fsynced. A kill -9
therefore loses at most the shard in flight. Opening a `StoreWriter` on an unfinished store
with the same header resumes it: complete shards are kept (and hashed again, for the
manifest's checksums), the partial files removed, and `resume_point()` says how many documents
of each source are stored, so the producer skips them; the finished store is byte-identical to
an uninterrupted write. A store with another header is refused unless `rebuild=True`.

Reading: `Store.open` memory-maps the shards read-only (np.memmap). A gs:// store is first
downloaded, shard by shard, to a local cache directory (memory maps need local files; training
reads random windows, which would be one request each on GCS), keyed by the manifest's hash so
that a rebuilt store is never confused with an old copy. `StoreWriter` writes local
directories only (renames and fsync have no GCS equivalent): write locally, then copy the
directory up (`gcloud storage cp -r DIR gs://bucket/dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

FORMAT = "jaxlm-token-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEADER = "writer.json"
PARTIAL = ".partial"
SHARD_RE = re.compile(r"^tokens-(\d{5})\.(bin|idx)$")
INDEX_COLUMNS = 3  # start offset in the shard, source index, bytes of text.
HEADER_KEYS = ("format", "format_version", "dtype", "vocab_size", "eot_id", "shard_tokens",
                "tokenizer", "sources")


def token_dtype(vocab_size: int) -> np.dtype:
  """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
  return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def shard_name(i: int) -> str:
  return f"tokens-{i:05d}"


def is_store_file(name: str) -> bool:
  base = name[:-len(PARTIAL)] if name.endswith(PARTIAL) else name
  return bool(SHARD_RE.match(base)) or base in (MANIFEST, HEADER)


def dumps(obj) -> bytes:
  return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_durable(path: str, data: bytes) -> None:
  """Writes `path` whole: temporary name, fsync, rename, fsync of the directory."""
  tmp = path + PARTIAL
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(os.path.dirname(path) or ".")


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def read_index(path: str) -> np.ndarray:
  return np.fromfile(path, dtype="<i8").reshape(-1, INDEX_COLUMNS)


def load_json(path: str, raw: bytes | None = None) -> dict:
  try:
    obj = json.loads(raw if raw is not None else open(path, "rb").read())
  except (OSError, ValueError) as e:
    raise JaxlmError(f"cannot read {path}: {e}") from None
  if not isinstance(obj, dict):
    raise JaxlmError(f"{path} is not a token store file (not a JSON object)")
  return obj


def first_difference(old: dict, new: dict) -> str | None:
  """Which header field differs, in words (None when the headers match)."""
  for key in HEADER_KEYS:
    mine = old.get(key)
    if key == "sources" and isinstance(mine, list):  # A manifest's sources also hold counts.
      mine = [{k: s.get(k) for k in ("name", "fingerprint")} for s in mine]
    if mine == new[key]:
      continue
    if key == "sources":
      a, b = mine or [], new[key]
      for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x["name"] != y["name"]:
          return f"source {i} is named {x['name']!r} there, {y['name']!r} now"
        if x["fingerprint"] != y["fingerprint"]:
          return (f"source {i} ({y['name']!r}) has fingerprint {x['fingerprint']!r} there, "
                  f"{y['fingerprint']!r} now")
      return f"it has {len(a)} sources, {len(b)} now"
    if key == "tokenizer":
      if isinstance(mine, dict):
        keys = sorted(set(mine) | set(new[key]), key=str)
        first = next(k for k in keys if mine.get(k) != new[key].get(k))
        return f"its tokenizer differs (in {first!r})"
      return "its tokenizer differs"
    return f"its {key} is {old.get(key)!r}, {new[key]!r} now"
  return None


def default_cache_dir() -> str:
  return workdir_lib.cache_dir("stores")


class Store:
  """A complete token store, read-only: use `Store.open`."""

  def __init__(self, directory: str, manifest: dict, shards: list[np.ndarray],
               documents: np.ndarray):
    self.directory = directory
    self.manifest = manifest
    self._shards = shards
    self._offsets = np.cumsum([0] + [len(s) for s in shards], dtype=np.int64)
    self.documents = documents

  @classmethod
  def open(cls, directory: str | os.PathLike, *, verify: bool = False,
           cache_dir: str = "") -> Store:
    """Opens a complete store; a gs:// one is first copied to `cache_dir` (see the module doc).

    Checks the format version and each shard's size against the manifest (a truncated or
    missing shard is a one-line error naming it); `verify=True` also checks the sha256 of every
    shard file, which reads them all.
    """
    text = os.fspath(directory)
    remote = workdir_lib.is_remote(text)
    root = workdir_lib.path(text)
    try:
      raw = (root / MANIFEST).read_bytes()
    except (FileNotFoundError, OSError):
      hint = (" (an unfinished write: run the writer again to resume it)"
              if (root / HEADER).exists() else "")
      raise JaxlmError(f"no token store at {text}: {MANIFEST} is missing{hint}") from None
    manifest = load_json(f"{text}/{MANIFEST}", raw)
    if manifest.get("format") != FORMAT:
      raise JaxlmError(f"{text}/{MANIFEST} is not a token store manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise JaxlmError(f"token store {text} has format version "
                       f"{manifest.get('format_version')!r}; this jaxlm reads version "
                       f"{FORMAT_VERSION}: rebuild the store with this jaxlm")
    local = os.fspath(root)
    if remote:
      local = os.path.join(cache_dir or default_cache_dir(), hashlib.sha256(raw).hexdigest())
      _download(root, local, manifest)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    shards, starts, sources = [], [], []
    offset = 0
    for s in manifest["shards"]:
      bin_path = os.path.join(local, s["name"] + ".bin")
      idx_path = os.path.join(local, s["name"] + ".idx")
      for path, size in ((bin_path, s["tokens"] * dtype.itemsize),
                         (idx_path, s["documents"] * INDEX_COLUMNS * 8)):
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != size:
          state = "missing" if actual is None else f"{actual} bytes"
          raise JaxlmError(f"token store {text}: {os.path.basename(path)} is {state}, the "
                           f"manifest says {size} bytes (truncated or damaged: rebuild it)")
      if verify:
        for path, key in ((bin_path, "sha256"), (idx_path, "idx_sha256")):
          if sha256_file(path) != s[key]:
            raise JaxlmError(f"token store {text}: {os.path.basename(path)} fails its sha256 "
                             "check (damaged: rebuild it)")
      shards.append(np.memmap(bin_path, dtype=dtype, mode="r"))
      index = read_index(idx_path)
      starts.append(index[:, 0] + offset)
      sources.append(index[:, 1])
      offset += s["tokens"]
    documents = np.zeros(manifest["totals"]["documents"],
                         dtype=[("start", "<i8"), ("source", "<i4")])
    if len(documents):
      documents["start"] = np.concatenate(starts)
      documents["source"] = np.concatenate(sources)
    return cls(text, manifest, shards, documents)

  @property
  def num_tokens(self) -> int:
    return int(self._offsets[-1])

  @property
  def num_documents(self) -> int:
    return len(self.documents)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.manifest["dtype"])

  @property
  def vocab_size(self) -> int:
    return self.manifest["vocab_size"]

  @property
  def eot_id(self) -> int:
    return self.manifest["eot_id"]

  @property
  def tokenizer(self) -> dict:
    return self.manifest["tokenizer"]

  @property
  def sources(self) -> list[dict]:
    """Per source, in order: name, fingerprint, documents, tokens, text_bytes."""
    return self.manifest["sources"]

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the whole store, across shard boundaries.

    Within one shard this is a read-only view of the memory map (no copy); across shards, one
    concatenated array.
    """
    if not 0 <= start <= stop <= self.num_tokens:
      raise JaxlmError(f"token range [{start}, {stop}) is outside [0, {self.num_tokens})")
    if start == stop:
      return np.zeros(0, dtype=self.dtype)
    first = int(np.searchsorted(self._offsets, start, side="right")) - 1
    last = int(np.searchsorted(self._offsets, stop, side="left")) - 1
    if first == last:
      o = self._offsets[first]
      return self._shards[first][start - o:stop - o]
    parts = [self._shards[i][max(start - self._offsets[i], 0):stop - self._offsets[i]]
             for i in range(first, last + 1)]
    return np.concatenate(parts)

  def document(self, i: int) -> np.ndarray:
    """The tokens of document i (ending with eot_id)."""
    starts = self.documents["start"]
    stop = int(starts[i + 1]) if i + 1 < len(starts) else self.num_tokens
    return self.tokens(int(starts[i]), stop)

  def source_documents(self, source: int) -> np.ndarray:
    """Indices of the documents of `source`, in order (a contiguous range when the producer
    fed the sources one after another)."""
    return np.flatnonzero(self.documents["source"] == source)


def _download(root, local: str, manifest: dict) -> None:
  """Copies a remote store's shards to `local` (atomically, file by file) unless already there."""
  os.makedirs(local, exist_ok=True)
  itemsize = np.dtype(manifest["dtype"]).itemsize
  for s in manifest["shards"]:
    for ext, size in (("bin", s["tokens"] * itemsize),
                      ("idx", s["documents"] * INDEX_COLUMNS * 8)):
      name = f"{s['name']}.{ext}"
      dst = os.path.join(local, name)
      if os.path.exists(dst) and os.path.getsize(dst) == size:
        continue
      tmp = f"{dst}.{os.getpid()}{PARTIAL}"
      try:
        with (root / name).open("rb") as src, open(tmp, "wb") as out:
          while chunk := src.read(1 << 24):
            out.write(chunk)
      except FileNotFoundError:
        raise JaxlmError(f"token store {root}: {name} is missing") from None
      os.replace(tmp, dst)
