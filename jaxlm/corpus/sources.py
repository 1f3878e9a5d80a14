"""Where training documents come from: files and datasets, streamed in a fixed order.

A `Source` is a set of files (a glob, local or gs://) and how to read them: text (a file is a
document), JSONL (a JSON object per line; its `text_field` is the document), Parquet (a string
column) or a Hugging Face dataset saved with `save_to_disk`; text and JSONL may be .gz, .xz or
.zst. Memory is bounded by a piece of text (`iter_pieces`) or a record, never a whole file.

It only reads: no tokenizing, caching or shuffling. Documents come in a fixed order (files
sorted by path, records in file order), so what a later step builds from a source is
reproducible, and `fingerprint` tells that step when the files changed. Input errors are
one-line `JaxlmError`s naming the file (and line, row or byte offset) and what is wrong; a
bad record of a record kind (JSONL, Parquet, hf_disk) fails the read, or with
on_bad_record="skip" is skipped and counted in `Stats`.

    source = sources.resolve("web", "gs://bucket/web/*.jsonl.zst")
    stats = sources.Stats()
    for text, last in sources.iter_pieces(source, stats=stats):
      ...  # `last` closes the document: a tokenizer appends EOS there.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from jaxlm import workdir as workdir_lib
from jaxlm.corpus import streams
from jaxlm.errors import JaxlmError

KINDS = ("text", "jsonl", "parquet", "hf_disk")
BAD_RECORD_POLICIES = ("fail", "skip")

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


def resolve(name: str, path: str, *, kind: str = "auto", text_field: str = "text",
            on_bad_record: str = "fail") -> Source:
  """Expands `path` (a file, directory or glob; local with ~, or gs://) into a `Source`.

  kind="auto" reads the kind from each match's extension after a compression suffix:
  .jsonl/.json -> jsonl, .parquet -> parquet, any other file -> text, and a directory
  holding dataset_info.json or state.json -> hf_disk; other directories are ignored. All
  matches must be of one kind. An explicit kind applies to every matched file.
  """
  if kind not in ("auto", *KINDS) or on_bad_record not in BAD_RECORD_POLICIES:
    raise JaxlmError(f"source {name!r}: kind={kind!r}, on_bad_record={on_bad_record!r}: "
                     f"expected a kind in auto, {', '.join(KINDS)} and fail or skip")
  remote = workdir_lib.is_remote(path)
  matches = _glob_remote(path) if remote else _glob_local(path)
  if not matches:
    raise JaxlmError(f"source {name!r}: no file matches {path!r}")
  by_kind: dict[str, list[str]] = collections.defaultdict(list)
  for match, is_dir in matches:
    if is_dir:  # Plain directories are left out: globs such as data/* match them too.
      found = _directory_kind(name, match, remote) if kind in ("auto", "hf_disk") else None
    else:
      found = _file_kind(match) if kind == "auto" else None if kind == "hf_disk" else kind
    if found:
      by_kind[found].append(match)
  if not by_kind:
    found = "no" if kind == "hf_disk" else "only directories, none of them a"
    raise JaxlmError(f"source {name!r}: {path!r} matches {found} dataset saved with "
                     f"save_to_disk (a directory holding {' or '.join(_HF_MARKERS)})")
  if len(by_kind) > 1:
    mixed = "; ".join(f"{len(v)} {k} ({_first(v)})" for k, v in sorted(by_kind.items()))
    raise JaxlmError(f"source {name!r}: {path!r} mixes kinds: {mixed}; make one source per "
                     "kind or pass kind=")
  (found_kind, files), = by_kind.items()
  compressions = {streams.compression(f) for f in files} - {""}
  if compressions and found_kind in ("parquet", "hf_disk"):
    raise JaxlmError(f"source {name!r}: {_first(files)}: a compressed {found_kind} file cannot "
                     "be streamed; Parquet compresses internally, leave it uncompressed")
  if ".zst" in compressions:
    streams.require("zstandard", f"source {name!r} has zstd-compressed files")
  if found_kind == "parquet":
    streams.require("pyarrow.parquet", f"source {name!r} has Parquet files")
  if found_kind == "hf_disk":
    streams.require("datasets", f"source {name!r} has datasets saved with save_to_disk",
                    "pip install datasets")
  return Source(name=name, kind=found_kind, files=tuple(sorted(files)), text_field=text_field,
                on_bad_record=on_bad_record, pattern=path)


def _glob_local(pattern: str) -> list[tuple[str, bool]]:
  """(absolute path, is a directory) for each match; `**` matches directories recursively."""
  found = glob.glob(os.path.expanduser(pattern), recursive=True)
  return [(os.path.abspath(p), os.path.isdir(p)) for p in found]


def _glob_remote(pattern: str) -> list[tuple[str, bool]]:
  """The same through the workdir path layer: the part before the first wildcard is listed."""
  root = workdir_lib.path(pattern)  # Checks the scheme and that gcsfs is installed.
  bucket, _, rest = pattern[len("gs://"):].partition("/")
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
  d = workdir_lib.path(directory)
  if (d / "dataset_dict.json").exists():
    splits = sorted(p.name for p in d.iterdir() if p.is_dir()) or ["train"]
    raise JaxlmError(f"source {name!r}: {directory} holds a DatasetDict (splits: "
                     f"{', '.join(splits)}): point the source at one, e.g. {d / splits[0]}")
  if not any((d / marker).exists() for marker in _HF_MARKERS):
    return None
  if remote:  # load_from_disk would copy the whole dataset to a local temporary directory.
    raise JaxlmError(f"source {name!r}: {directory} is a saved dataset on gs://; hf_disk "
                     "sources must be local: copy it first (gcloud storage cp -r)")
  return "hf_disk"


def _file_kind(path: str) -> str:
  ext = os.path.splitext(path.removesuffix(streams.compression(path)))[1].lower()
  return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(ext, "text")


def _first(items: list[str]) -> str:
  return os.path.basename(items[0]) + (", ..." if len(items) > 1 else "")


def fingerprint(source: Source) -> str:
  """A hex digest that changes when the source's documents may have changed.

  It covers the kind, text_field, the reading rules and (path, size, mtime in ns) of every
  file (of each file under an hf_disk directory). Nothing is read, so it is cheap: one stat
  per file (on gs://, whose mtimes have 1 s resolution, one metadata request). A rewrite with
  the same size in the same mtime tick goes unnoticed: the price of not hashing the bytes.
  The name and on_bad_record are left out: they change no document of a read that succeeds.
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
  files = [path] if kind != "hf_disk" else sorted(
      os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
  return [(f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files]


def iter_documents(source: Source, *, stats: Stats | None = None) -> Iterator[str]:
  """Every non-empty document of `source`, whole, in order (files sorted, records in order).

  Built on `iter_pieces`, joining a text file's pieces: memory is bounded by the largest
  document, for text a whole file. A reader of large text files uses `iter_pieces`.
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

  Empty documents are dropped (counted in `Stats.empty`). Raises a one-line JaxlmError for a
  file that cannot be read or is not UTF-8 (always: a text file is no record), for a bad
  record unless on_bad_record="skip", and at the end if the source had no documents.
  """
  if piece_bytes < 4:  # Room for the longest UTF-8 character.
    raise JaxlmError(f"piece_bytes must be at least 4, got {piece_bytes}")
  stats = stats if stats is not None else Stats()
  before = dataclasses.replace(stats)  # For this iteration's own counts at the end.
  for f in source.files:
    stats.file = f
    if source.kind == "text":  # An empty piece is an empty file: other pieces never are.
      items = ((text, last, None) for text, last in _text_pieces(f, piece_bytes))
    else:
      reader = {"jsonl": _jsonl_records, "parquet": _parquet_records, "hf_disk": _hf_records}
      items = ((text, True, problem) for text, problem in reader[source.kind](source, f))
    for text, last, problem in items:
      if problem is not None:
        message = f"{problem} (source {source.name!r}; on_bad_record='skip' skips such records)"
        if source.on_bad_record == "fail":
          raise JaxlmError(message)
        stats.first_skipped = stats.first_skipped or message
        stats.skipped += 1
      elif not text:
        stats.empty += 1
      else:
        stats.documents += last
        stats.bytes += len(text.encode("utf-8"))
        yield text, last
    stats.files_done += 1
    stats.disk_bytes_done += sum(size for _, size, _ in _stat_entries(f, source.kind))
  stats.file = ""
  if stats.documents == before.documents:
    raise JaxlmError(f"source {source.name!r} ({source.pattern}) has no documents: "
                     f"{len(source.files)} {source.kind} file(s), {stats.skipped - before.skipped}"
                     f" bad record(s) skipped, {stats.empty - before.empty} empty document(s)")


def _text_pieces(path: str, piece_bytes: int) -> Iterator[tuple[str, bool]]:
  """(text, last) pieces of one text file; one empty piece for an empty file."""
  offset = 0  # Decompressed bytes of the file before `buf`.
  buf = bytearray()
  with streams.open_bytes(path) as f:
    while chunk := f.read(piece_bytes):
      buf += chunk
      # Emit only pieces known not to be the last (bytes follow them); the rest at EOF.
      while len(buf) > piece_bytes:
        cut = _cut(buf, piece_bytes)
        yield _decode(bytes(buf[:cut]), path, offset), False
        offset += cut
        del buf[:cut]
  yield _decode(bytes(buf), path, offset), True


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
    where = " (decompressed)" if streams.compression(path) else ""
    raise JaxlmError(f"{path} is not UTF-8 text: invalid byte at offset "
                     f"{offset + e.start}{where}") from None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def _jsonl_records(source: Source, path: str) -> Iterator[tuple[str, str | None]]:
  """(text, None) per good line, ("", what is wrong) per bad one; blank lines are skipped."""
  with streams.open_bytes(path) as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        text, problem = _json_record(line, source.text_field)
        yield text, problem and f"{path}:{lineno}: {problem}"


def _json_record(line: bytes, field: str) -> tuple[str, str | None]:
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    return "", f"not UTF-8 (invalid byte at column {e.start + 1})"
  except json.JSONDecodeError as e:
    return "", f"not JSON ({e.msg} at column {e.colno})"
  if not isinstance(record, dict):
    return "", f"{_JSON_TYPES.get(type(record), 'a value')}, not a JSON object"
  if field not in record:
    fields = ", ".join(list(record)[:10]) + (", ..." if len(record) > 10 else "")
    return "", f"no field {field!r} (fields: {fields or 'none'})"
  if not isinstance(record[field], str):
    return "", f"field {field!r} is {_JSON_TYPES.get(type(record[field]))}, not a string"
  return record[field], None


def _parquet_records(source: Source, path: str) -> Iterator[tuple[str, str | None]]:
  """The text column of a Parquet file, read in record batches of that column only."""
  pq = streams.require("pyarrow.parquet", f"source {source.name!r} has Parquet files")
  import pyarrow as pa
  string = (pa.string(), pa.large_string(), getattr(pa, "string_view", pa.string)())
  field = source.text_field
  try:
    with contextlib.ExitStack() as stack:
      # A local path lets pyarrow read it natively; gs:// goes through a seekable gcsfs file.
      handle = (stack.enter_context(workdir_lib.path(path).open("rb"))
                if workdir_lib.is_remote(path) else path)
      pf = stack.enter_context(pq.ParquetFile(handle))
      schema = pf.schema_arrow
      _check_column(path, field, schema.names,
                    field in schema.names and schema.field(field).type, string)
      batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=[field])
      yield from _rows((b.column(0).to_pylist() for b in batches), path, field)
  except (pa.ArrowException, OSError) as e:  # JaxlmError is neither.
    raise JaxlmError(f"cannot read {path} as Parquet: {str(e).splitlines()[0]}") from None


def _check_column(path: str, field: str, names: list[str], column_type: Any,
                  string_types: tuple) -> None:
  if field not in names:
    raise JaxlmError(f"{path} has no column {field!r} (columns: {', '.join(names)}); "
                     "set the source's text_field")
  if column_type not in string_types:
    raise JaxlmError(f"{path}: column {field!r} is {column_type}, not a string column")


def _hf_records(source: Source, path: str) -> Iterator[tuple[str, str | None]]:
  """The text column of a saved Dataset, in row order (datasets memory-maps its Arrow files)."""
  datasets = streams.require(
      "datasets", f"source {source.name!r} has datasets saved with save_to_disk",
      "pip install datasets")
  field = source.text_field
  try:
    ds = datasets.load_from_disk(path)
  except (OSError, ValueError) as e:
    raise JaxlmError(f"cannot load {path} with datasets.load_from_disk: "
                     f"{str(e).splitlines()[0]}") from None
  feature = ds.features.get(field)
  _check_column(path, field, ds.column_names, getattr(feature, "dtype", feature),
                ("string", "large_string"))
  batches = ds.select_columns([field]).iter(batch_size=_BATCH_ROWS)
  yield from _rows((batch[field] for batch in batches), path, field)


def _rows(batches: Iterator[list], path: str, field: str) -> Iterator[tuple[str, str | None]]:
  """(text, None) per row of a column, ("", what is wrong) per null."""
  row = 0
  for values in batches:
    for value in values:
      row += 1
      yield ("", f"{path}: row {row}: {field!r} is null") if value is None else (value, None)
