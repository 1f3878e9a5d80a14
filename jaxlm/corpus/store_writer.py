"""Writing a token store document by document, atomically, resuming an interrupted write.

The format is described in store.py.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from jaxlm import workdir as workdir_lib
from jaxlm.corpus import store
from jaxlm.errors import JaxlmError


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
    self.dtype = store.token_dtype(vocab_size)
    self.vocab_size, self.eot_id, self.shard_tokens = vocab_size, eot_id, shard_tokens
    self.header = {
        "format": store.FORMAT, "format_version": store.FORMAT_VERSION, "dtype": self.dtype.name,
        "vocab_size": vocab_size, "eot_id": eot_id, "shard_tokens": shard_tokens,
        "tokenizer": tokenizer,
        "sources": [{"name": str(n), "fingerprint": str(f)} for n, f in sources],
    }
    # Normalizes the tokenizer to what JSON keeps (tuples -> lists) so comparisons are fair.
    try:
      self.header = json.loads(store.dumps(self.header))
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
    foreign = [n for n in names if not store.is_store_file(n)]
    ours = [n for n in names if store.is_store_file(n)]
    if foreign:
      raise JaxlmError(f"{self.directory} is not empty and is not a token store (it holds "
                       f"{foreign[0]!r}): pick an empty or new directory")
    manifest_path = os.path.join(self.directory, store.MANIFEST)
    header_path = os.path.join(self.directory, store.HEADER)
    old = None
    if os.path.exists(manifest_path):
      old = store.load_json(manifest_path)
    elif os.path.exists(header_path):
      old = store.load_json(header_path)
    elif any(not n.endswith(store.PARTIAL) for n in ours):
      old = {}  # Shards without any header: not ours to guess about.
    else:  # At most partial files of a first write killed before any shard: start afresh.
      for name in ours:
        os.remove(os.path.join(self.directory, name))
    if old is not None:
      diff = store.first_difference(old, self.header) if old else "it has no writer.json"
      if diff and not rebuild:
        raise JaxlmError(f"{self._where()} was written differently ({diff}): pass "
                         "rebuild=True to StoreWriter to delete and rewrite it, or delete "
                         "the directory")
      if diff:
        for name in ours:
          os.remove(os.path.join(self.directory, name))
        store.fsync_dir(self.directory)
        old = None
    if old is not None and os.path.exists(manifest_path):
      self.complete, self._manifest = True, old
      if os.path.exists(header_path):  # Killed between writing the manifest and this.
        os.remove(header_path)
      for i, s in enumerate(old["sources"]):
        self._docs[i] = s["documents"]
      return
    if old is None:
      store.write_durable(header_path, store.dumps(self.header))
      return
    self._resume()

  def _resume(self) -> None:
    """Keeps the complete shards 0..k-1 (an .idx marks one) and removes everything else."""
    k = 0
    while os.path.exists(self._path(k, "idx")):
      k += 1
    for name in os.listdir(self.directory):
      m = store.SHARD_RE.match(name.removesuffix(store.PARTIAL))
      if name.endswith(store.PARTIAL) or (m and int(m.group(1)) >= k):
        os.remove(os.path.join(self.directory, name))
    for i in range(k):
      bin_path, idx_path = self._path(i, "bin"), self._path(i, "idx")
      index = store.read_index(idx_path)
      n_tokens = os.path.getsize(bin_path) // self.dtype.itemsize
      if (os.path.getsize(bin_path) % self.dtype.itemsize or not len(index) or index[0, 0]
          or index[-1, 0] >= n_tokens or np.any(np.diff(index[:, 0]) <= 0)):
        raise JaxlmError(f"{self._where()}: shard {store.shard_name(i)} does not match its index: "
                         "pass rebuild=True to StoreWriter, or delete the directory")
      lengths = np.diff(np.append(index[:, 0], n_tokens))
      n = len(self._docs)
      if index[:, 1].min() < 0 or index[:, 1].max() >= n:
        raise JaxlmError(f"{self._where()}: shard {store.shard_name(i)} names a source outside the "
                         f"{n} sources: pass rebuild=True to StoreWriter, or delete the directory")
      per_source = [np.bincount(index[:, 1], weights=w, minlength=n).astype(np.int64)
                    for w in (None, lengths, index[:, 2])]
      for s, (d, t, b) in enumerate(zip(*per_source, strict=True)):
        self._docs[s] += int(d)
        self._tokens[s] += int(t)
        self._bytes[s] += int(b)
      self._shards.append(self._shard_entry(i, len(index), n_tokens, store.sha256_file(bin_path),
                                            store.sha256_file(idx_path)))
    store.fsync_dir(self.directory)

  # -- writing -------------------------------------------------------------------------------

  def _path(self, i: int, ext: str) -> str:
    return os.path.join(self.directory, f"{store.shard_name(i)}.{ext}")

  @staticmethod
  def _shard_entry(i: int, documents: int, tokens: int, sha: str, idx_sha: str) -> dict:
    return {"name": store.shard_name(i), "documents": documents, "tokens": tokens, "sha256": sha,
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
      self._file = open(self._path(len(self._shards), "bin") + store.PARTIAL, "wb")
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
    index = np.asarray(self._index, dtype="<i8").reshape(-1, store.INDEX_COLUMNS).tobytes()
    with open(idx_path + store.PARTIAL, "wb") as f:
      f.write(index)
      f.flush()
      os.fsync(f.fileno())
    os.replace(bin_path + store.PARTIAL, bin_path)
    os.replace(idx_path + store.PARTIAL, idx_path)  # Last: an .idx marks a complete shard.
    store.fsync_dir(self.directory)
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
    store.write_durable(os.path.join(self.directory, store.MANIFEST), store.dumps(manifest))
    os.remove(os.path.join(self.directory, store.HEADER))
    store.fsync_dir(self.directory)
    self._manifest = manifest
    return manifest
