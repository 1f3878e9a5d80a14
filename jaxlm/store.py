"""A sharded token store on disk: tokenized documents, written atomically and resumably.

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
_SHARD_RE = re.compile(r"^tokens-(\d{5})\.(bin|idx)$")
_INDEX_COLUMNS = 3  # start offset in the shard, source index, bytes of text.
_HEADER_KEYS = ("format", "format_version", "dtype", "vocab_size", "eot_id", "shard_tokens",
                "tokenizer", "sources")


def token_dtype(vocab_size: int) -> np.dtype:
  """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
  return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def shard_name(i: int) -> str:
  return f"tokens-{i:05d}"


def _is_store_file(name: str) -> bool:
  base = name[:-len(PARTIAL)] if name.endswith(PARTIAL) else name
  return bool(_SHARD_RE.match(base)) or base in (MANIFEST, HEADER)


def _dumps(obj) -> bytes:
  return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_durable(path: str, data: bytes) -> None:
  """Writes `path` whole: temporary name, fsync, rename, fsync of the directory."""
  tmp = path + PARTIAL
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path) or ".")


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def _read_index(path: str) -> np.ndarray:
  return np.fromfile(path, dtype="<i8").reshape(-1, _INDEX_COLUMNS)


def _load_json(path: str, raw: bytes | None = None) -> dict:
  try:
    obj = json.loads(raw if raw is not None else open(path, "rb").read())
  except (OSError, ValueError) as e:
    raise JaxlmError(f"cannot read {path}: {e}") from None
  if not isinstance(obj, dict):
    raise JaxlmError(f"{path} is not a token store file (not a JSON object)")
  return obj


def _first_difference(old: dict, new: dict) -> str | None:
  """Which header field differs, in words (None when the headers match)."""
  for key in _HEADER_KEYS:
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


class StoreWriter:
  """Writes a token store document by document; resumes an interrupted write.

  Args:
    directory: a local directory; created if missing. If it holds an unfinished store with the
      same header (tokenizer, sources, vocab_size, eot_id, shard_tokens), writing resumes
      after its complete shards (see `resume_point`). If it holds a complete store with the
      same header, `complete` is True and `close()` returns its manifest. A store with another
      header is refused unless `rebuild=True`, which deletes that store's files (only files
      named like a store's: shards, their partial files, manifest.json, writer.json).
    vocab_size: token ids are in [0, vocab_size); picks uint16 or uint32.
    tokenizer: the tokenizer's JSON dict, stored verbatim in the manifest.
    sources: (name, fingerprint) of each source, in order; `add` names them by index.
    eot_id: the end-of-text id that ends every document.
    shard_tokens: a shard is closed after the document that makes it reach this many tokens.
  """

  def __init__(self, directory: str | os.PathLike, *, vocab_size: int, tokenizer: dict,
               sources: list[tuple[str, str]], eot_id: int, shard_tokens: int = 1 << 26,
               rebuild: bool = False):
    if workdir_lib.is_remote(directory):
      raise JaxlmError(f"token stores are written to local directories, not {directory}: "
                       "write locally, then copy the directory up (gcloud storage cp -r)")
    if vocab_size < 1 or vocab_size > 1 << 32:
      raise JaxlmError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    if not 0 <= eot_id < vocab_size:
      raise JaxlmError(f"eot_id={eot_id} is not a token id of a vocab of {vocab_size}")
    if shard_tokens < 1:
      raise JaxlmError(f"shard_tokens must be positive, got {shard_tokens}")
    self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    self.dtype = token_dtype(vocab_size)
    self.vocab_size, self.eot_id, self.shard_tokens = vocab_size, eot_id, shard_tokens
    self.header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
        "vocab_size": vocab_size, "eot_id": eot_id, "shard_tokens": shard_tokens,
        "tokenizer": tokenizer,
        "sources": [{"name": str(n), "fingerprint": str(f)} for n, f in sources],
    }
    # Normalizes the tokenizer to what JSON keeps (tuples -> lists) so comparisons are fair.
    try:
      self.header = json.loads(_dumps(self.header))
    except (TypeError, ValueError) as e:
      raise JaxlmError(f"the tokenizer dict must be JSON: {e}") from None
    self.complete = False
    self._manifest: dict | None = None
    self._shards: list[dict] = []
    n = len(sources)
    self._docs, self._tokens, self._bytes = [0] * n, [0] * n, [0] * n
    self._file = None  # The open .bin.partial of the shard in flight.
    self._hash = None
    self._index: list[tuple[int, int, int]] = []
    self._shard_len = 0
    os.makedirs(self.directory, exist_ok=True)
    self._open_existing(rebuild)

  # -- opening -------------------------------------------------------------------------------

  def _where(self) -> str:
    return f"token store {self.directory}"

  def _open_existing(self, rebuild: bool) -> None:
    names = sorted(os.listdir(self.directory))
    foreign = [n for n in names if not _is_store_file(n)]
    ours = [n for n in names if _is_store_file(n)]
    if foreign:
      raise JaxlmError(f"{self.directory} is not empty and is not a token store (it holds "
                       f"{foreign[0]!r}): pick an empty or new directory")
    manifest_path = os.path.join(self.directory, MANIFEST)
    header_path = os.path.join(self.directory, HEADER)
    old = None
    if os.path.exists(manifest_path):
      old = _load_json(manifest_path)
    elif os.path.exists(header_path):
      old = _load_json(header_path)
    elif any(not n.endswith(PARTIAL) for n in ours):
      old = {}  # Shards without any header: not ours to guess about.
    else:  # At most partial files of a first write killed before any shard: start afresh.
      for name in ours:
        os.remove(os.path.join(self.directory, name))
    if old is not None:
      diff = _first_difference(old, self.header) if old else "it has no writer.json"
      if diff and not rebuild:
        raise JaxlmError(f"{self._where()} was written differently ({diff}): pass "
                         "rebuild=True to StoreWriter to delete and rewrite it, or delete "
                         "the directory")
      if diff:
        for name in ours:
          os.remove(os.path.join(self.directory, name))
        _fsync_dir(self.directory)
        old = None
    if old is not None and os.path.exists(manifest_path):
      self.complete, self._manifest = True, old
      if os.path.exists(header_path):  # Killed between writing the manifest and this.
        os.remove(header_path)
      for i, s in enumerate(old["sources"]):
        self._docs[i] = s["documents"]
      return
    if old is None:
      _write_durable(header_path, _dumps(self.header))
      return
    self._resume()

  def _resume(self) -> None:
    """Keeps the complete shards 0..k-1 (an .idx marks one) and removes everything else."""
    k = 0
    while os.path.exists(self._path(k, "idx")):
      k += 1
    for name in os.listdir(self.directory):
      m = _SHARD_RE.match(name.removesuffix(PARTIAL))
      if name.endswith(PARTIAL) or (m and int(m.group(1)) >= k):
        os.remove(os.path.join(self.directory, name))
    for i in range(k):
      bin_path, idx_path = self._path(i, "bin"), self._path(i, "idx")
      index = _read_index(idx_path)
      n_tokens = os.path.getsize(bin_path) // self.dtype.itemsize
      if (os.path.getsize(bin_path) % self.dtype.itemsize or not len(index) or index[0, 0]
          or index[-1, 0] >= n_tokens or np.any(np.diff(index[:, 0]) <= 0)):
        raise JaxlmError(f"{self._where()}: shard {shard_name(i)} does not match its index: "
                         "pass rebuild=True to StoreWriter, or delete the directory")
      lengths = np.diff(np.append(index[:, 0], n_tokens))
      n = len(self._docs)
      if index[:, 1].min() < 0 or index[:, 1].max() >= n:
        raise JaxlmError(f"{self._where()}: shard {shard_name(i)} names a source outside the "
                         f"{n} sources: pass rebuild=True to StoreWriter, or delete the directory")
      per_source = [np.bincount(index[:, 1], weights=w, minlength=n).astype(np.int64)
                    for w in (None, lengths, index[:, 2])]
      for s, (d, t, b) in enumerate(zip(*per_source, strict=True)):
        self._docs[s] += int(d)
        self._tokens[s] += int(t)
        self._bytes[s] += int(b)
      self._shards.append(self._shard_entry(i, len(index), n_tokens, _sha256_file(bin_path),
                                            _sha256_file(idx_path)))
    _fsync_dir(self.directory)

  # -- writing -------------------------------------------------------------------------------

  def _path(self, i: int, ext: str) -> str:
    return os.path.join(self.directory, f"{shard_name(i)}.{ext}")

  @staticmethod
  def _shard_entry(i: int, documents: int, tokens: int, sha: str, idx_sha: str) -> dict:
    return {"name": shard_name(i), "documents": documents, "tokens": tokens, "sha256": sha,
            "idx_sha256": idx_sha}

  def _count(self, source: int, tokens: int, text_bytes: int) -> None:
    self._docs[source] += 1
    self._tokens[source] += tokens
    self._bytes[source] += text_bytes

  def resume_point(self) -> list[int]:
    """Documents already stored, per source: the producer skips that many of each source."""
    return list(self._docs)

  @property
  def num_shards(self) -> int:
    """Complete shards so far (the shard in flight is not counted)."""
    return len(self._shards)

  def add(self, source_index: int, tokens: np.ndarray, text_bytes: int) -> None:
    """Appends one document: `tokens` already ends with eot_id (checked, as are the ids).

    `text_bytes` is the size of the document's text, counted per source in the manifest.
    """
    if self.complete or self._manifest is not None:
      raise JaxlmError(f"{self._where()} is complete (manifest.json): nothing can be added")
    if not 0 <= source_index < len(self._docs):
      raise JaxlmError(f"source_index={source_index} is not one of the {len(self._docs)} "
                       "sources")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not len(tokens) or tokens.dtype.kind not in "iu":
      raise JaxlmError(f"a document is a non-empty 1-D integer array, got {tokens.dtype} "
                       f"of shape {tokens.shape}")
    if tokens[-1] != self.eot_id:
      raise JaxlmError(f"a document must end with the end-of-text id {self.eot_id}, this one "
                       f"ends with {int(tokens[-1])}: append eot_id to each document")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= self.vocab_size:
      raise JaxlmError(f"token id {lo if lo < 0 else hi} is outside the vocab of "
                       f"{self.vocab_size}")
    if text_bytes < 0:
      raise JaxlmError(f"text_bytes must be >= 0, got {text_bytes}")
    if self._file is None:
      self._file = open(self._path(len(self._shards), "bin") + PARTIAL, "wb")
      self._hash = hashlib.sha256()
    data = tokens.astype(self.dtype).tobytes()
    self._file.write(data)
    self._hash.update(data)
    self._index.append((self._shard_len, source_index, int(text_bytes)))
    self._shard_len += len(tokens)
    self._count(source_index, len(tokens), int(text_bytes))
    if self._shard_len >= self.shard_tokens:
      self._close_shard()

  def _close_shard(self) -> None:
    i = len(self._shards)
    bin_path, idx_path = self._path(i, "bin"), self._path(i, "idx")
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    index = np.asarray(self._index, dtype="<i8").reshape(-1, _INDEX_COLUMNS).tobytes()
    with open(idx_path + PARTIAL, "wb") as f:
      f.write(index)
      f.flush()
      os.fsync(f.fileno())
    os.replace(bin_path + PARTIAL, bin_path)
    os.replace(idx_path + PARTIAL, idx_path)  # Last: an .idx marks a complete shard.
    _fsync_dir(self.directory)
    self._shards.append(self._shard_entry(i, len(self._index), self._shard_len,
                                          self._hash.hexdigest(),
                                          hashlib.sha256(index).hexdigest()))
    self._file, self._hash, self._index, self._shard_len = None, None, [], 0

  def close(self) -> dict:
    """Closes the last shard, writes manifest.json (last) and returns the manifest."""
    if self._manifest is not None:
      return self._manifest
    if self._file is not None:
      self._close_shard()
    sources = [{**s, "documents": d, "tokens": t, "text_bytes": b} for s, d, t, b in
               zip(self.header["sources"], self._docs, self._tokens, self._bytes,
                   strict=True)]
    manifest = {**self.header, "sources": sources, "shards": self._shards,
                "totals": {"documents": sum(self._docs), "tokens": sum(self._tokens),
                           "text_bytes": sum(self._bytes)}}
    _write_durable(os.path.join(self.directory, MANIFEST), _dumps(manifest))
    os.remove(os.path.join(self.directory, HEADER))
    _fsync_dir(self.directory)
    self._manifest = manifest
    return manifest


def default_cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "jaxlm", "stores")


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
    manifest = _load_json(f"{text}/{MANIFEST}", raw)
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
                         (idx_path, s["documents"] * _INDEX_COLUMNS * 8)):
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != size:
          state = "missing" if actual is None else f"{actual} bytes"
          raise JaxlmError(f"token store {text}: {os.path.basename(path)} is {state}, the "
                           f"manifest says {size} bytes (truncated or damaged: rebuild it)")
      if verify:
        for path, key in ((bin_path, "sha256"), (idx_path, "idx_sha256")):
          if _sha256_file(path) != s[key]:
            raise JaxlmError(f"token store {text}: {os.path.basename(path)} fails its sha256 "
                             "check (damaged: rebuild it)")
      shards.append(np.memmap(bin_path, dtype=dtype, mode="r"))
      index = _read_index(idx_path)
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
                      ("idx", s["documents"] * _INDEX_COLUMNS * 8)):
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
