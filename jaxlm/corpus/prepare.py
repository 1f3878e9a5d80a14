"""`jaxlm prepare`: data.sources -> tokenizer -> a train and a val token store, with progress.

The store directory (data.store, or a cache directory named by a hash of everything the tokens
depend on, spec.store_key) holds:

  prepare.json   the key and the tokenizer, written first (a resumed write reuses the tokenizer
                 rather than training it again)
  train/, val/   two token stores (store.py): each source's training documents, and its
                 validation documents (its val_path, or the documents held out of its path)

Documents are read in order by a reader thread and encoded a batch of about `batch_bytes` at a
time on the main thread: a BPE's encode_batch runs on every core with the GIL released, so
reading the next batch (decompressing, parsing JSON) overlaps it. Memory is bounded by a few
batches plus the longest document. A killed prepare resumes: each store keeps its complete
shards and the producer skips the documents they hold (store_writer.py).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from jaxlm import tokenizers
from jaxlm import workdir as workdir_lib
from jaxlm.corpus import sources as sources_lib
from jaxlm.corpus import spec as spec_lib
from jaxlm.corpus import store as store_lib
from jaxlm.corpus.store_writer import StoreWriter
from jaxlm.errors import JaxlmError

PREPARE_JSON = "prepare.json"
SPLITS = ("train", "val")
_MIN_SAMPLE_FILE_BYTES = 1 << 20  # A BPE sample reads at least this much of each file it opens.


@dataclasses.dataclass(frozen=True)
class Prepared:
  directory: str
  tokenizer: tokenizers.Tokenizer
  train: store_lib.Store
  val: store_lib.Store


def open_or_prepare(spec: spec_lib.DataSpec, *, rebuild: bool = False,
                    log: Callable[[str], None] = print, batch_bytes: int = 8 << 20,
                    shard_tokens: int = 1 << 26) -> Prepared:
  """The prepared stores of `spec`, preparing (or finishing) them first when needed.

  A complete store named by data.store is used as it is when its sources (or tokenizer file)
  are not on this machine, as on the hosts of a pod slice reading a store prepared elsewhere;
  where they are, a store prepared from other ones is refused.
  """
  try:
    resolved = spec_lib.resolve(spec)
    key = spec_lib.store_key(spec, resolved)
  except JaxlmError as e:
    if not (spec.store and _is_complete(spec_lib.store_dir(spec, {}))):
      raise
    log(f"prepare: {e}; using the prepared store {spec.store} as it is, unchecked")
    resolved, key = None, None
  directory = spec_lib.store_dir(spec, key or {})
  if workdir_lib.is_remote(directory):
    return _open_remote(directory, key, spec.cache_dir)
  if key is None:
    return _open(directory, store_lib.load_json(os.path.join(directory, PREPARE_JSON)))
  # One preparer per store: the processes of a run on one machine, or a sweep's parallel
  # trials, wait here for the first, then find its store complete.
  os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
  with open(directory.rstrip("/") + ".lock", "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log(f"prepare: waiting for another process preparing {directory}")
      fcntl.flock(lock, fcntl.LOCK_EX)
    return _open_or_prepare_locked(spec, resolved, key, directory, rebuild, log, batch_bytes,
                                   shard_tokens)


def _open_or_prepare_locked(spec, resolved, key, directory, rebuild, log, batch_bytes,
                            shard_tokens) -> Prepared:
  meta_path = os.path.join(directory, PREPARE_JSON)
  meta = store_lib.load_json(meta_path) if os.path.exists(meta_path) else None
  complete = all(os.path.exists(os.path.join(directory, s, store_lib.MANIFEST)) for s in SPLITS)
  if meta is not None and meta.get("key") != key:
    why = _key_difference(meta.get("key") or {}, key)
    if not complete:  # Nothing finished to lose: an interrupted write of another config.
      rebuild = True
    if not rebuild:
      raise JaxlmError(f"token store {directory} was prepared from {why}: refusing to "
                       "overwrite it; run `jaxlm prepare --rebuild` with this config to "
                       "rebuild it, or set data.store to another directory")
    log(f"prepare: rebuilding {directory}: it was {'' if complete else 'partly '}prepared "
        f"from {why}")
    _remove_store(directory)
    meta = None
  if meta is not None and complete:
    return _open(directory, meta)
  if os.path.isdir(directory) and meta is None and os.listdir(directory):
    raise JaxlmError(f"data.store={directory} is not empty and is not a token store made by "
                     "jaxlm prepare: pick an empty or new directory")
  if meta is None:
    log(f"prepare: building the tokenizer ({_describe_tokenizer(spec)})")
    t0 = time.perf_counter()
    tok = build_tokenizer(spec, resolved)
    log(f"prepare: tokenizer {tok.kind}, vocab {tok.vocab_size:,}, end-of-text id "
        f"{tok.eot_id} ({time.perf_counter() - t0:.1f}s)")
    meta = {"key": key, "tokenizer": tok.to_json()}
    os.makedirs(directory, exist_ok=True)
    store_lib.write_durable(meta_path, store_lib.dumps(meta))
  else:
    log(f"prepare: resuming the unfinished store {directory}")
  _write(spec, resolved, directory, meta, log, batch_bytes, shard_tokens)
  return _open(directory, meta)


def _is_complete(directory: str) -> bool:
  root = workdir_lib.path(directory)
  return (root / PREPARE_JSON).exists() and all(
      (root / s / store_lib.MANIFEST).exists() for s in SPLITS)


def _open(directory: str, meta: dict) -> Prepared:
  train, val = (store_lib.Store.open(os.path.join(directory, s)) for s in SPLITS)
  return Prepared(directory, tokenizers.from_json(meta["tokenizer"]), train, val)


def _open_remote(directory: str, key: dict | None, cache_dir: str) -> Prepared:
  try:
    meta = json.loads(workdir_lib.read_text(f"{directory}/{PREPARE_JSON}"))
  except (OSError, ValueError):
    raise JaxlmError(f"no prepared token store at {directory}: prepare it on a local disk "
                     "(jaxlm prepare with data.store there), then copy the directory up") from None
  if key is not None and meta.get("key") != key:
    raise JaxlmError(f"token store {directory} was prepared from "
                     f"{_key_difference(meta.get('key') or {}, key)}: prepare it again and "
                     "copy it up")
  train, val = (store_lib.Store.open(f"{directory}/{s}", cache_dir=cache_dir) for s in SPLITS)
  return Prepared(directory, tokenizers.from_json(meta["tokenizer"]), train, val)


def _key_difference(old: dict, new: dict) -> str:
  """In words, the first thing that differs between two store keys."""
  if old.get("tokenizer") != new["tokenizer"]:
    return f"another tokenizer ({old.get('tokenizer')} there, {new['tokenizer']} now)"
  a, b = old.get("sources") or [], new["sources"]
  for x, y in zip(a, b, strict=False):
    if x[0] != y[0]:
      return f"other sources (source {x[0]!r} there, {y[0]!r} now)"
    if x[1:] != y[1:]:
      return f"source {y[0]!r} as it was before it changed (its files differ now)"
  if len(a) != len(b):
    return f"{len(a)} sources, not the {len(b)} of this config"
  diff = next((k for k in new if old.get(k) != new[k]), "version")
  return f"other settings ({diff}: {old.get(diff)!r} there, {new[diff]!r} now)"


def _remove_store(directory: str) -> None:
  """Deletes what prepare wrote there (store files, prepare.json) and nothing else."""
  for split in SPLITS:
    sub = os.path.join(directory, split)
    if os.path.isdir(sub):
      for name in os.listdir(sub):
        if store_lib.is_store_file(name):
          os.remove(os.path.join(sub, name))
      if not os.listdir(sub):
        os.rmdir(sub)
  os.remove(os.path.join(directory, PREPARE_JSON))


# -- the tokenizer -----------------------------------------------------------------------------

def _describe_tokenizer(spec: spec_lib.DataSpec) -> str:
  if spec.tokenizer == "bpe":
    return (f"byte-level BPE of vocab {spec.vocab_size:,} trained on a "
            f"{spec.bpe_sample_bytes / 2**20:g} MB sample")
  if spec.tokenizer == "char":
    return "char: one pass over every source for its characters"
  return spec.tokenizer


def build_tokenizer(spec: spec_lib.DataSpec,
                    resolved: spec_lib.Resolved) -> tokenizers.Tokenizer:
  """The tokenizer of the store, with an end-of-text id to end documents with."""
  if spec.tokenizer == "byte":
    return tokenizers.ByteTokenizer(eot=True)
  if spec.tokenizer == "char":
    chars: set[str] = set()
    for source in (*resolved.train, *resolved.val):
      for text, _ in sources_lib.iter_pieces(source) if source else ():
        chars.update(text)
    return tokenizers.CharTokenizer("".join(chars), eot=True)
  if spec.tokenizer == "bpe":
    if spec.vocab_size < tokenizers.MIN_BPE_VOCAB + 1:
      raise JaxlmError(f"data.vocab_size={spec.vocab_size} is too small: a byte-level BPE with "
                       f"an end-of-text token needs at least {tokenizers.MIN_BPE_VOCAB + 1}")
    return tokenizers.BpeTokenizer.train(bpe_sample(spec, resolved), spec.vocab_size, eot=True)
  tok = tokenizers.load(spec.tokenizer)
  if tok.eot_id is None:
    raise JaxlmError(f"tokenizer {spec.tokenizer} has no end-of-text token (looked for "
                     f"{', '.join(tokenizers.EOT_CANDIDATES)}): documents need one to end with")
  return tok


def bpe_sample(spec: spec_lib.DataSpec, resolved: spec_lib.Resolved) -> list[str]:
  """A bounded, deterministic sample of the training text: each source's share of the budget
  by weight, spread over its files (the first pieces of every file, or of every k-th file when
  the budget would give a file less than 1 MB)."""
  sample: list[str] = []
  positive = sum(s.weight for s in spec.sources)
  for s, source in zip(spec.sources, resolved.train, strict=True):
    if source is None or s.weight == 0:
      continue
    budget = spec.bpe_sample_bytes * s.weight / positive
    stride = max(1, int(np.ceil(len(source.files) * _MIN_SAMPLE_FILE_BYTES / budget)))
    files = source.files[::stride]
    per_file = budget / len(files)
    for f in files:
      taken, stats = 0, sources_lib.Stats()
      try:
        for text, _ in sources_lib.iter_pieces(dataclasses.replace(source, files=(f,)),
                                               piece_bytes=1 << 20, stats=stats):
          sample.append(text)
          taken += len(text.encode("utf-8"))
          if taken >= per_file:
            break
      except JaxlmError:
        if stats.documents:  # A file with no documents adds nothing; any other error counts.
          raise
  return sample


# -- writing -----------------------------------------------------------------------------------

def is_held_out(source: str, ordinal: int, fraction: float) -> bool:
  """Whether document `ordinal` of `source` is a validation document: a hash of both, so the
  held-out documents are spread over the whole source, and the same on every run."""
  digest = hashlib.blake2b(f"{source}\0{ordinal}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") < fraction * 2.0**64


def _documents(spec: spec_lib.DataSpec, resolved: spec_lib.Resolved,
               skip: dict[str, list[int]], stats: _FileStats,
               ) -> Iterator[tuple[str, int, str, bool]]:
  """(split, source index, text piece, last piece of its document) of everything to write.

  The documents a resumed store already holds (`skip`, per split and source) are read but not
  yielded. Each source's documents are yielded together, so they are contiguous in each store.
  """
  for i, s in enumerate(spec.sources):
    seen = {split: 0 for split in SPLITS}
    for which, source in (("path", resolved.train[i]), ("val_path", resolved.val[i])):
      if source is None:
        continue
      ordinal, split = 0, None
      for text, last in sources_lib.iter_pieces(source, stats=stats):
        stats.note(len(text))  # Characters: close enough to bytes for a progress line.
        if split is None:  # The first piece of a document decides where it goes.
          held = not s.val_path and is_held_out(s.name, ordinal, spec.val_fraction)
          split = "val" if which == "val_path" or held else "train"
        if seen[split] >= skip[split][i]:
          yield split, i, text, last
        if last:
          seen[split] += 1
          ordinal, split = ordinal + 1, None


def _batches(items: Iterator, batch_bytes: int, out: queue.Queue, stop: threading.Event) -> None:
  """Reader thread: groups items into lists of about batch_bytes of text, ends with None."""
  try:
    batch, size = [], 0
    for item in items:
      batch.append(item)
      size += len(item[2])
      if size >= batch_bytes:
        out.put(batch)
        batch, size = [], 0
        if stop.is_set():
          return
    out.put(batch)
    out.put(None)
  except BaseException as e:  # Handed to the main thread, which raises it.
    out.put(e)


class Progress:
  """Every few seconds: MB and documents done of the total, MB/s, tokens/s, ETA."""

  def __init__(self, total_disk_bytes: int, log: Callable[[str], None], every: float = 5.0):
    self.total, self.log, self.every = max(total_disk_bytes, 1), log, every
    self.t0 = self.last = time.perf_counter()
    self.tokens = 0

  def update(self, stats: _FileStats, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    elapsed = max(now - self.t0, 1e-9)
    # Files done count whole; the file in flight by its text read so far (exact when
    # uncompressed, and capped so a compressed one never passes 100%).
    done = min(stats.disk_bytes_done + stats.bytes_in_file, self.total)
    fraction = done / self.total
    rate = stats.bytes / elapsed
    eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
    self.log(f"prepare: {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({100 * fraction:.1f}%)"
             f" | {stats.documents:,} documents | {rate / 1e6:.1f} MB/s | "
             f"{self.tokens / elapsed / 1e6:.2f}M tokens/s | ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  m, s = divmod(int(round(seconds)), 60)
  return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _write(spec: spec_lib.DataSpec, resolved: spec_lib.Resolved, directory: str, meta: dict,
           log: Callable[[str], None], batch_bytes: int, shard_tokens: int) -> None:
  tok = tokenizers.from_json(meta["tokenizer"])
  fps = {"train": [sources_lib.fingerprint(t) if t else "" for t in resolved.train],
         "val": [sources_lib.fingerprint(v or t) if (v or t) else ""
                 for t, v in zip(resolved.train, resolved.val, strict=True)]}
  writers = {split: StoreWriter(
      os.path.join(directory, split), vocab_size=tok.vocab_size, tokenizer=meta["tokenizer"],
      sources=[(s.name, f) for s, f in zip(spec.sources, fps[split], strict=True)],
      eot_id=tok.eot_id, shard_tokens=shard_tokens) for split in SPLITS}
  skip = {split: w.resume_point() for split, w in writers.items()}
  stats = _FileStats()
  progress = Progress(sum(sources_lib.total_bytes(x) for x in (*resolved.train, *resolved.val)
                          if x), log)
  q: queue.Queue = queue.Queue(maxsize=2)
  stop = threading.Event()
  reader = threading.Thread(target=_batches, daemon=True,
                            args=(_documents(spec, resolved, skip, stats), batch_bytes, q, stop))
  reader.start()
  # The pieces of a document not yet ended, per (split, source): token arrays, text bytes.
  pending: dict[tuple[str, int], tuple[list[np.ndarray], list[int]]] = {}
  eot = np.array([tok.eot_id])
  try:
    while (batch := q.get()) is not None:
      if isinstance(batch, BaseException):
        raise batch
      texts = [text for _, _, text, _ in batch]
      for (split, i, text, last), ids in zip(batch, tokenizers.encode_batch(tok, texts),
                                             strict=True):
        parts, sizes = pending.setdefault((split, i), ([], []))
        parts.append(ids)
        sizes.append(len(text.encode("utf-8")))
        progress.tokens += len(ids)
        if last:
          del pending[(split, i)]
          writers[split].add(i, np.concatenate(parts + [eot]), sum(sizes))
      progress.update(stats)
  finally:
    stop.set()
    while reader.is_alive():  # Unblock a reader waiting on a full queue, then let it end.
      try:
        q.get(timeout=0.1)
      except queue.Empty:
        pass
  progress.update(stats, force=True)
  if stats.skipped:
    log(f"prepare: skipped {stats.skipped:,} bad records (data.on_bad_record=skip); the "
        f"first: {stats.first_skipped}")
  _check_counts(spec, writers, directory)
  for split, w in writers.items():
    m = w.close()
    log(f"prepare: {split}: " + ", ".join(
        f"{s['name']} {s['documents']:,} documents, {s['tokens']:,} tokens" for s in
        m["sources"]) + f" ({len(m['shards'])} shard(s))")


def _check_counts(spec: spec_lib.DataSpec, writers: dict[str, StoreWriter],
                  directory: str) -> None:
  """Every trained source has training documents, every source validation documents."""
  train, val = (writers[s].resume_point() for s in SPLITS)
  for i, s in enumerate(spec.sources):
    if s.weight > 0 and not train[i]:
      raise JaxlmError(f"source {s.name!r} has no training documents: all {val[i]} were held "
                       f"out (data.val_fraction={spec.val_fraction}); lower it or give the "
                       "source a val_path")
    if not val[i]:
      raise JaxlmError(f"source {s.name!r} has no validation documents: none of its "
                       f"{train[i]} documents was held out at data.val_fraction="
                       f"{spec.val_fraction}; give it a val_path (separate validation files) "
                       f"or raise data.val_fraction (store {directory} is kept unfinished)")


@dataclasses.dataclass
class _FileStats(sources_lib.Stats):
  """Stats plus the text bytes read of the file in flight, for progress within a file."""
  bytes_in_file: int = 0
  counted_file: str = ""
  bytes_at_file: int = 0

  def note(self, piece_bytes: int) -> None:
    """Called after each piece: `bytes` already counts it."""
    if self.file != self.counted_file:
      self.counted_file, self.bytes_at_file = self.file, self.bytes - piece_bytes
    self.bytes_in_file = self.bytes - self.bytes_at_file
