"""Where training documents come from: files and datasets, streamed in a fixed order.

A `Source` names a set of files (a glob, local or gs://) and how to read them: plain text (one
file is one document), JSONL (one JSON object per line, its `text_field` string is the
document), Parquet (a string column) or a Hugging Face dataset saved with `save_to_disk`. Text
and JSONL files may be compressed (.gz, .xz, .zst). Reading is streamed: memory is bounded by a
piece of text (`iter_pieces`), a record, or a small batch of records, never a whole file.

This module only reads. It does not tokenize, cache or shuffle; the order it yields documents
in (files sorted by path, records in file order) is deterministic, so what a later step builds
from a source is reproducible, and `fingerprint` tells that step when the files changed.

    source = sources.resolve("web", "gs://bucket/web/*.jsonl.zst")
    stats = sources.Stats()
    for text, last in sources.iter_pieces(source, stats=stats):
      ...  # `last` closes the document: a tokenizer appends EOS there.

Errors in the input are one-line `JaxlmError`s that name the file (and the line, row or byte
offset) and what is wrong. A bad record in a record kind (JSONL, Parquet, hf_disk) fails the
read, or with on_bad_record="skip" is skipped and counted in `Stats`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import re
from collections.abc import Iterator
from typing import IO, Any

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

KINDS = ("text", "jsonl", "parquet", "hf_disk")
BAD_RECORD_POLICIES = ("fail", "skip")
COMPRESSIONS = (".gz", ".xz", ".zst")  # Stripped before the kind is read from the extension.
DATA_EXTRA = "pip install 'jaxlm[data]'"

# Bumped when the reading rules change (what counts as a document), so a fingerprint taken
# under other rules no longer matches.
_READ_RULES = 1
_BATCH_ROWS = 256  # Parquet / hf_disk rows converted to Python at a time.
_HF_MARKERS = ("dataset_info.json", "state.json")  # What Dataset.save_to_disk writes.
_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved set of files and how to read them; build one with `resolve`."""
  name: str  # For logs and metrics, e.g. "web".
  kind: str  # One of KINDS.
  files: tuple[str, ...]  # Sorted; absolute local paths or gs:// URLs (hf_disk: directories).
  text_field: str = "text"  # The JSONL field / Parquet or dataset column holding the text.
  on_bad_record: str = "fail"  # "fail" | "skip" (record kinds only).
  pattern: str = ""  # What was resolved, for messages.


@dataclasses.dataclass
class Stats:
  """What an iteration read so far; pass one in to watch progress or count skipped records."""
  documents: int = 0  # Non-empty documents yielded.
  bytes: int = 0  # UTF-8 bytes of the text yielded.
  skipped: int = 0  # Bad records skipped (on_bad_record="skip").
  empty: int = 0  # Empty documents dropped (an empty text file, a record with "").
  files_done: int = 0
  disk_bytes_done: int = 0  # On-disk bytes of the files done: compare with total_bytes().
  file: str = ""  # The file being read now.
  first_skipped: str = ""  # The error the first skipped record would have raised.


# ---------------------------------------------------------------------------------------------
# Resolving a pattern into files.
# ---------------------------------------------------------------------------------------------


def resolve(name: str, path: str, *, kind: str = "auto", text_field: str = "text",
            on_bad_record: str = "fail") -> Source:
  """Expands `path` (a file, directory or glob; local with ~, or gs://) into a `Source`.

  kind="auto" reads the kind from each match's extension after a compression suffix:
  .jsonl/.json -> jsonl, .parquet -> parquet, any other file -> text, and a directory
  holding dataset_info.json or state.json -> hf_disk; other directories are ignored. All
  matches must be of one kind. An explicit kind applies to every matched file.
  """
  if kind != "auto" and kind not in KINDS:
    raise JaxlmError(f"source {name!r}: unknown kind {kind!r}: expected auto or one of "
                     f"{', '.join(KINDS)}")
  if on_bad_record not in BAD_RECORD_POLICIES:
    raise JaxlmError(f"source {name!r}: on_bad_record={on_bad_record!r}: expected fail or skip")
  remote = workdir_lib.is_remote(path)
  matches = _glob_remote(path) if remote else _glob_local(path)
  if not matches:
    raise JaxlmError(f"source {name!r}: no file matches {path!r}")
  by_kind: dict[str, list[str]] = collections.defaultdict(list)
  for match, is_dir in matches:
    if is_dir:
      if kind not in ("auto", "hf_disk") or _directory_kind(name, match, remote) is None:
        continue  # A plain directory: globs such as data/* match them too.
      by_kind["hf_disk"].append(match)
    else:
      by_kind[kind if kind not in ("auto", "hf_disk") else _file_kind(match)].append(match)
  if kind == "hf_disk":
    by_kind = {"hf_disk": by_kind.get("hf_disk", [])}
    if not by_kind["hf_disk"]:
      raise JaxlmError(f"source {name!r}: {path!r} matches no dataset saved with save_to_disk "
                       f"(a directory holding {' or '.join(_HF_MARKERS)})")
  if not by_kind:
    raise JaxlmError(f"source {name!r}: {path!r} matches only directories, none of them a "
                     "dataset saved with save_to_disk")
  if len(by_kind) > 1:
    mixed = "; ".join(f"{len(v)} {k} ({_first(v)})" for k, v in sorted(by_kind.items()))
    raise JaxlmError(f"source {name!r}: {path!r} mixes kinds: {mixed}; make one source per "
                     "kind or pass kind=")
  (found_kind, files), = by_kind.items()
  for f in files:
    if found_kind in ("parquet", "hf_disk") and _compression(f):
      raise JaxlmError(f"source {name!r}: {f} is a compressed {found_kind} file, which cannot "
                       "be streamed; Parquet compresses internally, leave it uncompressed")
    if _compression(f) == ".zst":
      _require("zstandard", f"source {name!r} has zstd-compressed files")
  if found_kind == "parquet":
    _require("pyarrow.parquet", f"source {name!r} has Parquet files")
  if found_kind == "hf_disk":
    _require("datasets", f"source {name!r} has datasets saved with save_to_disk",
             "pip install datasets")
  return Source(name=name, kind=found_kind, files=tuple(sorted(files)), text_field=text_field,
                on_bad_record=on_bad_record, pattern=path)


def _glob_local(pattern: str) -> list[tuple[str, bool]]:
  """(absolute path, is a directory) for each match; `**` matches directories recursively."""
  found = glob.glob(os.path.expanduser(pattern), recursive=True)
  return [(os.path.abspath(p), os.path.isdir(p)) for p in found]


def _glob_remote(pattern: str) -> list[tuple[str, bool]]:
  """The same through the workdir path layer: the part before the first wildcard is listed."""
  bucket, _, rest = pattern[pattern.index("://") + 3:].partition("/")
  root = workdir_lib.path(pattern)  # Checks the scheme and that gcsfs is installed.
  parts = rest.split("/")
  wild = next((i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part)), None)
  if wild is None:
    return [(os.fspath(root), root.is_dir())] if root.exists() else []
  if "**" in rest:
    raise JaxlmError(f"{pattern!r}: ** is not supported on gs:// (it lists the whole bucket); "
                     "use * per directory level")
  base = workdir_lib.path(f"gs://{bucket}/" + "/".join(parts[:wild]))
  return [(os.fspath(p), p.is_dir()) for p in base.glob("/".join(parts[wild:]))]


def _directory_kind(name: str, directory: str, remote: bool) -> str | None:
  """hf_disk for a directory Dataset.save_to_disk wrote, None for any other directory."""
  if remote:
    d = workdir_lib.path(directory)
    if any((d / marker).exists() for marker in _HF_MARKERS):
      # load_from_disk copies a remote dataset whole to a local temporary directory.
      raise JaxlmError(f"source {name!r}: {directory} is a saved dataset on gs://; hf_disk "
                       "sources must be local: copy it first (gcloud storage cp -r)")
    return None
  if os.path.exists(os.path.join(directory, "dataset_dict.json")):
    splits = sorted(e for e in os.listdir(directory)
                    if os.path.isdir(os.path.join(directory, e)))
    raise JaxlmError(f"source {name!r}: {directory} holds a DatasetDict (splits: "
                     f"{', '.join(splits)}): point the source at one split, e.g. "
                     f"{os.path.join(directory, splits[0] if splits else 'train')}")
  if any(os.path.exists(os.path.join(directory, m)) for m in _HF_MARKERS):
    return "hf_disk"
  return None


def _compression(path: str) -> str:
  """The compression suffix of `path` ('' for none)."""
  return next((c for c in COMPRESSIONS if path.endswith(c)), "")


def _file_kind(path: str) -> str:
  stem = path[:len(path) - len(_compression(path))]
  ext = os.path.splitext(stem)[1].lower()
  return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(ext, "text")


def _first(items: list[str]) -> str:
  return os.path.basename(items[0]) + (", ..." if len(items) > 1 else "")


def _require(module: str, why: str, hint: str = DATA_EXTRA) -> Any:
  """Imports an optional dependency, or a one-line error saying why it is needed and how."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise JaxlmError(f"{why}; install {module.split('.')[0]}: {hint}") from None


# ---------------------------------------------------------------------------------------------
# What changed, and how much there is.
# ---------------------------------------------------------------------------------------------


def fingerprint(source: Source) -> str:
  """A hex digest that changes when the source's documents may have changed.

  It covers the kind, text_field and the reading rules, and (path, size, mtime in ns) of
  every file: of each file under an hf_disk directory. Nothing is read, so it is cheap (one
  stat per file; on gs:// an object listing, whose mtimes have 1 s resolution). A file
  rewritten with the same size within the same mtime tick goes unnoticed: that is the price
  of not hashing the bytes. The name and on_bad_record are left out: they do not change
  which documents come out of a read that succeeds.
  """
  h = hashlib.sha256()
  h.update(json.dumps([_READ_RULES, source.kind, source.text_field]).encode("utf-8"))
  for f in source.files:
    for entry in _stat_entries(f, source.kind):
      h.update(b"\n" + json.dumps(entry).encode("utf-8"))
  return h.hexdigest()


def total_bytes(source: Source) -> int:
  """On-disk bytes of the source's files (compressed, where they are): for progress."""
  return sum(size for f in source.files for _, size, _ in _stat_entries(f, source.kind))


def _stat_entries(path: str, kind: str) -> list[tuple[str, int, int]]:
  """(path, size, mtime_ns) of a file, or of every file under an hf_disk directory."""
  if workdir_lib.is_remote(path):
    st = workdir_lib.path(path).stat()
    return [(path, int(st.length), int(st.mtime) * 10**9)]
  if kind != "hf_disk":
    st = os.stat(path)
    return [(path, st.st_size, st.st_mtime_ns)]
  entries = []
  for root, dirs, names in os.walk(path):
    dirs.sort()
    for n in sorted(names):
      st = os.stat(os.path.join(root, n))
      entries.append((os.path.join(root, n), st.st_size, st.st_mtime_ns))
  return entries


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------


def iter_documents(source: Source, *, stats: Stats | None = None) -> Iterator[str]:
  """Every non-empty document of `source`, whole, in order (files sorted, records in order).

  Built on `iter_pieces`: a record is one piece, a text file's pieces are joined, so memory
  is bounded by the largest document, which for text is a whole file. A tokenizer that must
  stay small on large text files reads `iter_pieces` instead.
  """
  parts: list[str] = []
  for piece, last in iter_pieces(source, stats=stats):
    parts.append(piece)
    if last:
      yield "".join(parts)
      parts = []


def iter_pieces(source: Source, *, piece_bytes: int = 8 << 20,
                stats: Stats | None = None) -> Iterator[tuple[str, bool]]:
  """(text, is the last piece of its document) for every non-empty document, in order.

  A text file is one document cut into pieces of at most `piece_bytes` UTF-8 bytes: after the
  last newline within that size (the newline stays with the piece before it), or, in a line
  longer than that, at the last character boundary. Concatenating a document's pieces gives
  it back exactly. A record (JSONL line, Parquet or dataset row) is one piece, however long.

  Raises a one-line JaxlmError for a file that cannot be read or is not UTF-8, for a bad
  record unless on_bad_record="skip" (a text file is no record: invalid UTF-8 in one always
  fails, as its earlier pieces are out already), and at the end if the source had no
  documents. Empty documents are dropped and counted in `Stats.empty`.
  """
  if piece_bytes < 4:  # Room for the longest UTF-8 character.
    raise JaxlmError(f"piece_bytes must be at least 4, got {piece_bytes}")
  stats = stats if stats is not None else Stats()
  counts = Stats()  # This iteration's own counts, for the no-documents message.
  for f in source.files:
    stats.file = f
    if source.kind == "text":
      pieces = _text_pieces(f, piece_bytes)
      started = False
      for text, last, nbytes in pieces:
        started = True
        stats.bytes += nbytes
        counts.documents += last
        stats.documents += last
        yield text, last
      if not started:
        stats.empty += 1
        counts.empty += 1
    else:
      for text in _records(source, f, stats, counts):
        if not text:
          stats.empty += 1
          counts.empty += 1
          continue
        stats.bytes += len(text.encode("utf-8"))
        stats.documents += 1
        counts.documents += 1
        yield text, True
    stats.files_done += 1
    stats.disk_bytes_done += sum(size for _, size, _ in _stat_entries(f, source.kind))
  stats.file = ""
  if not counts.documents:
    raise JaxlmError(f"source {source.name!r} ({source.pattern}) has no documents: "
                     f"{len(source.files)} {source.kind} file(s), {counts.skipped} bad "
                     f"record(s) skipped, {counts.empty} empty document(s)")


@contextlib.contextmanager
def _open(path: str) -> Iterator[IO[bytes]]:
  """A binary stream of the file's decompressed bytes (gzip, xz and zstd by suffix).

  Bytes, not text mode: pieces are cut by byte count and errors report byte offsets; the text
  is decoded here, strictly, as UTF-8.
  """
  with contextlib.ExitStack() as stack:
    if workdir_lib.is_remote(path):
      raw = stack.enter_context(workdir_lib.path(path).open("rb"))
    else:
      raw = stack.enter_context(open(path, "rb"))
    compression = _compression(path)
    if compression == ".gz":
      raw = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    elif compression == ".xz":
      raw = stack.enter_context(lzma.LZMAFile(raw))
    elif compression == ".zst":
      zstandard = _require("zstandard", f"{path} is zstd-compressed")
      raw = stack.enter_context(io.BufferedReader(_ZstdReader(raw, zstandard), 1 << 16))
    yield raw


class _ZstdReader(io.RawIOBase):
  """The frames of a zstd stream decompressed one after another; a cut-off frame raises.

  Not zstandard's stream_reader: at a truncated end it returns what it has without a word,
  and a truncated corpus file must not pass for a shorter one. Input is fed 64 KiB at a time,
  so what is held is that chunk's output (a few MB for text; more for extreme ratios).
  """

  def __init__(self, raw: IO[bytes], zstandard: Any):
    self._raw, self._zstd = raw, zstandard
    self._frame = None  # The decompressor of the frame under way, if one is.
    self._out, self._pos = b"", 0  # Decompressed bytes not yet read, and where reading is.

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    while self._pos == len(self._out):
      data = self._raw.read(1 << 16)
      if not data:
        if self._frame is not None:
          raise self._zstd.ZstdError("the stream ends inside a frame")
        return 0
      self._out, self._pos = b"", 0
      while data:
        if self._frame is None:
          self._frame = self._zstd.ZstdDecompressor().decompressobj()
        self._out += self._frame.decompress(data)
        data = b""
        if self._frame.eof:  # What follows the frame is the next one.
          data, self._frame = self._frame.unused_data, None
    n = min(len(b), len(self._out) - self._pos)
    b[:n] = self._out[self._pos:self._pos + n]
    self._pos += n
    return n


def _read_errors() -> tuple[type[BaseException], ...]:
  """What a corrupt or truncated compressed stream raises (gzip raises an OSError)."""
  errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
  try:
    import zstandard
    errors += (zstandard.ZstdError,)
  except ImportError:
    pass
  return errors


def _unreadable(path: str, e: BaseException) -> JaxlmError:
  what = f"{_compression(path)[1:]} stream" if _compression(path) else "file"
  return JaxlmError(f"cannot read {path}: corrupt or truncated {what} "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _text_pieces(path: str, piece_bytes: int) -> Iterator[tuple[str, bool, int]]:
  """(text, last, its UTF-8 bytes) pieces of one text file; nothing for an empty file."""
  errors = _read_errors()
  offset = 0  # Decompressed bytes of the file before `buf`.
  buf = bytearray()
  with _open(path) as f:
    while True:
      try:
        chunk = f.read(piece_bytes)
      except errors as e:
        raise _unreadable(path, e) from None
      buf += chunk
      # Emit only pieces known not to be the last (bytes follow them), then the rest at EOF.
      while len(buf) > piece_bytes or (not chunk and buf):
        cut = _cut(buf, piece_bytes) if len(buf) > piece_bytes else len(buf)
        yield _decode(bytes(buf[:cut]), path, offset), cut == len(buf), cut
        offset += cut
        del buf[:cut]
      if not chunk:
        return


def _cut(buf: bytearray, piece_bytes: int) -> int:
  """Where to end a piece of at most piece_bytes: after a newline, else on a char boundary."""
  newline = buf.rfind(b"\n", 0, piece_bytes)
  if newline >= 0:
    return newline + 1
  cut = piece_bytes
  # Back off continuation bytes (10xxxxxx) to the start of the character they belong to.
  while cut > piece_bytes - 3 and buf[cut] & 0xC0 == 0x80:
    cut -= 1
  return cut


def _decode(data: bytes, path: str, offset: int) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    where = " (decompressed)" if _compression(path) else ""
    raise JaxlmError(f"{path} is not UTF-8 text: invalid byte at offset "
                     f"{offset + e.start}{where}") from None


def _records(source: Source, path: str, stats: Stats, counts: Stats) -> Iterator[str]:
  """The text of each good record of one file; bad ones raise or are counted as skipped."""
  reader = {"jsonl": _jsonl_records, "parquet": _parquet_records, "hf_disk": _hf_records}
  for text, problem in reader[source.kind](source, path):
    if problem is None:
      yield text
      continue
    message = f"{problem} (source {source.name!r}; on_bad_record='skip' skips such records)"
    if source.on_bad_record == "fail":
      raise JaxlmError(message)
    stats.skipped += 1
    counts.skipped += 1
    stats.first_skipped = stats.first_skipped or message


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def _jsonl_records(source: Source, path: str) -> Iterator[tuple[str, str | None]]:
  """(text, None) per good line, ("", what is wrong) per bad one; blank lines are skipped."""
  field = source.text_field
  errors = _read_errors()
  with _open(path) as f:
    lineno = 0
    while True:
      try:
        line = f.readline()
      except errors as e:
        raise _unreadable(path, e) from None
      if not line:
        return
      lineno += 1
      where = f"{path}:{lineno}"
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError as e:
        yield "", f"{where}: not UTF-8 (invalid byte at column {e.start + 1})"
        continue
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        yield "", f"{where}: not JSON ({e.msg} at column {e.colno})"
        continue
      if not isinstance(record, dict):
        yield "", f"{where}: {_JSON_TYPES.get(type(record), 'a value')}, not a JSON object"
      elif field not in record:
        fields = ", ".join(list(record)[:10]) + (", ..." if len(record) > 10 else "")
        yield "", f"{where}: no field {field!r} (fields: {fields or 'none'})"
      elif not isinstance(record[field], str):
        yield "", f"{where}: field {field!r} is {_JSON_TYPES.get(type(record[field]))}, " \
                  "not a string"
      else:
        yield record[field], None


def _parquet_records(source: Source, path: str) -> Iterator[tuple[str, str | None]]:
  """The text column of a Parquet file, read in record batches of that column only."""
  pq = _require("pyarrow.parquet", f"source {source.name!r} has Parquet files")
  import pyarrow as pa
  field = source.text_field
  with contextlib.ExitStack() as stack:
    # A local path lets pyarrow read it natively; gs:// goes through a seekable gcsfs file.
    handle = (stack.enter_context(workdir_lib.path(path).open("rb"))
              if workdir_lib.is_remote(path) else path)
    try:
      pf = stack.enter_context(pq.ParquetFile(handle))
    except (pa.ArrowException, OSError) as e:
      raise JaxlmError(f"cannot read {path} as Parquet: {str(e).splitlines()[0]}") from None
    schema = pf.schema_arrow
    if field not in schema.names:
      raise JaxlmError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)}); "
                       "set the source's text_field")
    column_type = schema.field(field).type
    string_types = (pa.types.is_string, pa.types.is_large_string,
                    getattr(pa.types, "is_string_view", lambda _: False))  # pyarrow >= 16
    if not any(is_type(column_type) for is_type in string_types):
      raise JaxlmError(f"{path}: column {field!r} is {column_type}, not a string column")
    row = 0
    batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=[field])
    while True:
      try:
        batch = next(batches, None)
      except pa.ArrowException as e:
        raise JaxlmError(f"cannot read {path} (after row {row}): "
                         f"{str(e).splitlines()[0]}") from None
      if batch is None:
        return
      for value in batch.column(0).to_pylist():
        row += 1
        yield ("", f"{path}: row {row}: {field!r} is null") if value is None else (value, None)


def _hf_records(source: Source, path: str) -> Iterator[tuple[str, str | None]]:
  """The text column of a saved Dataset, in row order (datasets memory-maps its Arrow files)."""
  datasets = _require("datasets", f"source {source.name!r} has datasets saved with save_to_disk",
                      "pip install datasets")
  field = source.text_field
  try:
    ds = datasets.load_from_disk(path)
  except (OSError, ValueError) as e:
    raise JaxlmError(f"cannot load {path} with datasets.load_from_disk: "
                     f"{str(e).splitlines()[0]}") from None
  if field not in ds.column_names:
    raise JaxlmError(f"{path} has no column {field!r} (columns: {', '.join(ds.column_names)}); "
                     "set the source's text_field")
  feature = ds.features[field]
  if getattr(feature, "dtype", None) not in ("string", "large_string"):
    raise JaxlmError(f"{path}: column {field!r} is {feature}, not a string column")
  row = 0
  for batch in ds.select_columns([field]).iter(batch_size=_BATCH_ROWS):
    for value in batch[field]:
      row += 1
      yield ("", f"{path}: row {row}: {field!r} is null") if value is None else (value, None)
