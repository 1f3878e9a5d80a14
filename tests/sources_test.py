"""Corpus sources: every kind and compression round-trips, in order, with one-line errors.

Every file is written by the test into tmp_path (or, for gs://, into a local GCS emulator in
this process, as in workdir_test.py); nothing needs the network.
"""

import contextlib
import gzip
import json
import lzma
import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import start_gcs_emulator

from jaxlm import workdir as workdir_lib
from jaxlm.corpus import sources, streams
from jaxlm.errors import JaxlmError

COMPRESSORS = {
    "": lambda b: b,
    ".gz": lambda b: gzip.compress(b, compresslevel=1),  # Fast: tests write megabytes.
    ".xz": lambda b: lzma.compress(b, preset=0),
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}
TEXT = "First line.\nCafé, naïve — 東京 😀\n\nno newline at the end"


def write(path, data: bytes | str) -> str:
  """Writes `data` to `path`, compressed as its suffix says; returns the path as a string."""
  path = os.fspath(path)
  raw = data.encode("utf-8") if isinstance(data, str) else data
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(COMPRESSORS[streams.compression(path)](raw))
  return path


def jsonl(*records) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


def docs(path, **kwargs) -> list[str]:
  return list(sources.iter_documents(sources.resolve("test", os.fspath(path), **kwargs)))


def one_line_error(excinfo, *fragments) -> str:
  message = str(excinfo.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message
  return message


# ---------------------------------------------------------------------------------------------
# Resolving.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [
    ("a.txt", "text"), ("a.md", "text"), ("README", "text"), ("a.txt.gz", "text"),
    ("a.jsonl", "jsonl"), ("a.json", "jsonl"), ("a.jsonl.zst", "jsonl"), ("a.JSON.xz", "jsonl"),
    ("a.parquet", "parquet"),
])
def test_kind_from_the_extension_after_the_compression_suffix(tmp_path, name, kind):
  write(tmp_path / name, "")
  source = sources.resolve("s", str(tmp_path / name))
  assert (source.kind, source.files) == (kind, (str(tmp_path / name),))


def test_files_are_sorted_absolute_and_found_under_home(tmp_path, monkeypatch):
  for n in ("b.txt", "a.txt", "c.txt"):
    write(tmp_path / "d" / n, n)
  (tmp_path / "d" / "sub.txt").mkdir()  # A directory matching the glob is not a file.
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  expected = tuple(str(tmp_path / "d" / n) for n in ("a.txt", "b.txt", "c.txt"))
  assert sources.resolve("s", "~/d/*.txt").files == expected
  assert sources.resolve("s", "d/*.txt").files == expected


def test_unresolvable_patterns_are_one_line_errors(tmp_path):
  write(tmp_path / "a.txt", "x")
  write(tmp_path / "b.jsonl", jsonl({"text": "y"}))
  (tmp_path / "dir").mkdir()
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "*.nothing"))
  one_line_error(e, "'web'", "no file matches", "*.nothing")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "di*"))
  one_line_error(e, "matches only directories")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "*"))
  one_line_error(e, "mixes kinds", "1 jsonl (b.jsonl)", "1 text (a.txt)")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "a.txt"), kind="csv")
  one_line_error(e, "kind='csv'", "expected a kind in auto, text, jsonl")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "a.txt"), on_bad_record="ignore")
  one_line_error(e, "on_bad_record='ignore'")
  write(tmp_path / "c.parquet.gz", b"")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "c.parquet.gz"))
  one_line_error(e, "c.parquet.gz: a compressed parquet file cannot be streamed")


def test_an_explicit_kind_overrides_the_extension(tmp_path):
  write(tmp_path / "a.data", jsonl({"text": "one"}))
  write(tmp_path / "b.txt", jsonl({"text": "two"}))
  assert docs(tmp_path / "*", kind="jsonl") == ["one", "two"]


def test_missing_optional_packages_give_install_hints(tmp_path, monkeypatch):
  write(tmp_path / "a.txt.zst", "x")
  write(tmp_path / "b.parquet", b"")
  monkeypatch.setitem(sys.modules, "zstandard", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "a.txt.zst"))
  one_line_error(e, "'web' has zstd-compressed files", "pip install 'jaxlm[data]'")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", str(tmp_path / "b.parquet"))
  one_line_error(e, "'web' has Parquet files; install pyarrow: pip install 'jaxlm[data]'")


# ---------------------------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_text_files_round_trip_exactly(tmp_path, suffix):
  write(tmp_path / f"b.txt{suffix}", TEXT)
  write(tmp_path / f"a.txt{suffix}", "\r\nwindows line\r\n")  # Bytes as they are: no newline
  write(tmp_path / f"c.txt{suffix}", "")  # translation; an empty file is no document.
  stats = sources.Stats()
  source = sources.resolve("s", str(tmp_path / f"*.txt{suffix}"))
  assert list(sources.iter_documents(source, stats=stats)) == ["\r\nwindows line\r\n", TEXT]
  assert (stats.documents, stats.empty, stats.files_done) == (2, 1, 3)
  assert stats.bytes == len(TEXT.encode()) + len("\r\nwindows line\r\n")
  assert stats.disk_bytes_done == sources.total_bytes(source) == sum(
      os.path.getsize(f) for f in source.files)


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_a_large_text_file_comes_in_pieces_split_after_newlines(tmp_path, suffix):
  rng = random.Random(0)
  words = ["a", "bb", "é", "€€", "😀", "東京", " "]
  lines = ["".join(rng.choices(words, k=rng.randrange(0, 200))) + "\n" for _ in range(40_000)]
  text = "".join(lines) + "tail without newline"
  assert len(text.encode()) > 3 << 20
  write(tmp_path / f"big.txt{suffix}", text)
  write(tmp_path / "small.txt", "small\n")
  piece_bytes = 64 << 10
  pieces = list(sources.iter_pieces(sources.resolve("s", str(tmp_path / "*")),
                                    piece_bytes=piece_bytes))
  big, small = pieces[:-1], pieces[-1]
  assert small == ("small\n", True)
  assert len(big) > 40
  assert "".join(p for p, _ in big) == text
  assert [last for _, last in big] == [False] * (len(big) - 1) + [True]
  for piece, _ in big[:-1]:
    assert piece.endswith("\n")
    assert piece_bytes - 2000 < len(piece.encode()) <= piece_bytes  # Lines are at most 1201 bytes.


def test_reading_streams(tmp_path, monkeypatch):
  """The first document comes after reading a piece or a line, not the whole file."""
  piece_bytes = 64 << 10
  write(tmp_path / "big.txt.gz", "line\n" * (1 << 20))
  write(tmp_path / "big.jsonl.gz", jsonl(*({"text": "x" * 100} for _ in range(50_000))))
  opened = []
  real_open = streams.open_bytes

  @contextlib.contextmanager
  def watched_open(path):
    with real_open(path) as f:
      opened.append(f)
      yield f

  monkeypatch.setattr(streams, "open_bytes", watched_open)
  for name in ("big.txt.gz", "big.jsonl.gz"):
    pieces = sources.iter_pieces(sources.resolve("s", str(tmp_path / name)),
                                 piece_bytes=piece_bytes)
    next(pieces)
    assert opened[-1].tell() <= 2 * piece_bytes  # Decompressed bytes read so far.
    pieces.close()


def test_zstd_frames_are_read_one_after_another(tmp_path):
  path = str(tmp_path / "a.txt.zst")
  with open(path, "wb") as f:
    for part in ("first frame\n", "", "second 😀\n"):
      f.write(zstandard.ZstdCompressor().compress(part.encode()))
  assert docs(path) == ["first frame\nsecond 😀\n"]


@pytest.mark.parametrize("piece_bytes", range(4, 12))
def test_a_long_line_is_cut_between_characters(tmp_path, piece_bytes):
  text = "aé€😀" * 50 + "\n" + "😀" * 20  # 1-, 2-, 3- and 4-byte characters, few newlines.
  write(tmp_path / "a.txt", text)
  pieces = list(sources.iter_pieces(sources.resolve("s", str(tmp_path / "a.txt")),
                                    piece_bytes=piece_bytes))
  assert "".join(p for p, _ in pieces) == text
  assert all(0 < len(p.encode()) <= piece_bytes for p, _ in pieces)
  assert [last for _, last in pieces].count(True) == 1 and pieces[-1][1]
  # A newline within a piece's reach ends it: the piece after "\n" starts the next line.
  assert any(p.endswith("\n") for p, _ in pieces)


def test_multibyte_characters_at_the_split_stay_whole(tmp_path):
  # The newline sits before the piece_bytes mark; the mark falls inside a 4-byte character.
  text = "ab\n" + "cd😀" + "\n"
  write(tmp_path / "a.txt", text)
  pieces = list(sources.iter_pieces(sources.resolve("s", str(tmp_path / "a.txt")),
                                    piece_bytes=5))
  assert pieces == [("ab\n", False), ("cd", False), ("😀\n", True)]


@pytest.mark.parametrize("suffix", ["", ".xz"])
def test_invalid_utf8_names_the_file_and_offset(tmp_path, suffix):
  path = write(tmp_path / f"a.txt{suffix}", b"good\nbad \xff here\n")
  with pytest.raises(JaxlmError) as e:
    docs(path)
  one_line_error(e, path, "not UTF-8", "offset 9")


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".zst"])
def test_a_corrupt_compressed_file_is_a_one_line_error(tmp_path, suffix):
  path = str(tmp_path / f"a.jsonl{suffix}")
  data = COMPRESSORS[suffix](jsonl(*({"text": str(i)} for i in range(1000))).encode())
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])  # Truncated.
  with pytest.raises(JaxlmError) as e:
    docs(path)
  one_line_error(e, f"cannot read {path}: corrupt or truncated {suffix[1:]} stream")
  with open(path, "wb") as f:
    f.write(data[:8] + b"garbage" * 10)
  with pytest.raises(JaxlmError) as e:
    docs(path)
  one_line_error(e, f"cannot read {path}: corrupt or truncated {suffix[1:]} stream")


def test_piece_bytes_must_hold_a_character(tmp_path):
  write(tmp_path / "a.txt", "x")
  with pytest.raises(JaxlmError) as e:
    next(sources.iter_pieces(sources.resolve("s", str(tmp_path / "a.txt")), piece_bytes=3))
  one_line_error(e, "piece_bytes must be at least 4")


# ---------------------------------------------------------------------------------------------
# JSONL.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_jsonl_records_in_file_order(tmp_path, suffix):
  write(tmp_path / f"2.jsonl{suffix}", jsonl({"text": "c", "id": 3}))
  first = jsonl({"text": "a\nmulti-line 😀"}) + "\n   \n" + jsonl({"id": 2, "text": "b"})
  write(tmp_path / f"1.jsonl{suffix}", first + jsonl({"text": ""}))
  stats = sources.Stats()
  source = sources.resolve("s", str(tmp_path / "*"))
  assert list(sources.iter_documents(source, stats=stats)) == ["a\nmulti-line 😀", "b", "c"]
  assert (stats.documents, stats.empty, stats.skipped) == (3, 1, 0)
  assert list(sources.iter_pieces(source)) == [("a\nmulti-line 😀", True), ("b", True),
                                               ("c", True)]


def test_jsonl_text_field(tmp_path):
  write(tmp_path / "a.jsonl", jsonl({"text": 1, "content": "body"}))
  assert docs(tmp_path / "a.jsonl", text_field="content") == ["body"]


@pytest.mark.parametrize("line, problem", [
    (b"not json", "not JSON (Expecting value at column 1)"),
    (b"[1, 2]", "an array, not a JSON object"),
    (b'"text"', "a string, not a JSON object"),
    (b'{"body": "x", "id": 1}', "no field 'text' (fields: body, id)"),
    (b'{"text": 3}', "field 'text' is a number, not a string"),
    (b'{"text": null}', "field 'text' is null, not a string"),
    (b'{"text": "caf\xe9"}', "not UTF-8 (invalid byte at column 14)"),
])
def test_a_bad_jsonl_line_fails_or_is_skipped(tmp_path, line, problem):
  data = jsonl({"text": "one"}).encode() + b"\n" + line + b"\n" + jsonl({"text": "two"}).encode()
  path = write(tmp_path / "a.jsonl.gz", data)
  with pytest.raises(JaxlmError) as e:
    docs(path)
  one_line_error(e, f"{path}:3: {problem}", "on_bad_record='skip'")
  stats = sources.Stats()
  source = sources.resolve("s", path, on_bad_record="skip")
  assert list(sources.iter_documents(source, stats=stats)) == ["one", "two"]
  assert stats.skipped == 1 and stats.first_skipped.startswith(f"{path}:3: {problem}")


def test_a_source_without_documents_fails_when_iteration_ends(tmp_path):
  write(tmp_path / "empty.jsonl", "\n\n")
  with pytest.raises(JaxlmError) as e:
    docs(tmp_path / "empty.jsonl")
  one_line_error(e, "source 'test'", "empty.jsonl) has no documents", "1 jsonl file(s)")
  write(tmp_path / "bad.jsonl", "nope\n" + jsonl({"text": ""}))
  with pytest.raises(JaxlmError) as e:
    docs(tmp_path / "bad.jsonl", on_bad_record="skip")
  one_line_error(e, "has no documents", "1 bad record(s) skipped, 1 empty document(s)")
  write(tmp_path / "t" / "empty.txt", "")
  with pytest.raises(JaxlmError) as e:
    docs(tmp_path / "t" / "*")
  one_line_error(e, "has no documents")


# ---------------------------------------------------------------------------------------------
# Parquet.
# ---------------------------------------------------------------------------------------------


def write_parquet(path, columns: dict, row_group_size: int = 7) -> str:
  pq.write_table(pa.table(columns), os.fspath(path), row_group_size=row_group_size)
  return os.fspath(path)


def test_parquet_reads_the_column_across_row_groups_in_order(tmp_path):
  first = [f"doc {i} é" for i in range(50)]
  write_parquet(tmp_path / "a.parquet", {"id": list(range(50)), "text": first})
  write_parquet(tmp_path / "b.parquet", {"text": pa.array(["last"], pa.large_string())})
  assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 8
  assert docs(tmp_path / "*.parquet") == first + ["last"]


def test_parquet_bad_columns_and_null_rows(tmp_path):
  path = write_parquet(tmp_path / "a.parquet", {"id": [1, 2], "body": ["x", "y"]})
  with pytest.raises(JaxlmError) as e:
    docs(path)
  one_line_error(e, f"{path} has no column 'text' (columns: id, body)")
  with pytest.raises(JaxlmError) as e:
    docs(path, text_field="id")
  one_line_error(e, "column 'id' is int64, not a string column")
  path = write_parquet(tmp_path / "n.parquet", {"text": ["a"] * 9 + [None, "b"]})
  with pytest.raises(JaxlmError) as e:
    docs(path)
  one_line_error(e, f"{path}: row 10: 'text' is null")
  assert docs(path, on_bad_record="skip") == ["a"] * 9 + ["b"]
  bad = write(tmp_path / "bad.parquet", b"not parquet at all")
  with pytest.raises(JaxlmError) as e:
    docs(bad)
  one_line_error(e, f"cannot read {bad} as Parquet")


# ---------------------------------------------------------------------------------------------
# Datasets saved with save_to_disk.
# ---------------------------------------------------------------------------------------------


def test_hf_disk_round_trip(tmp_path):
  import datasets  # In the dev extra; imported here as it takes most of a second.
  texts = [f"row {i} 😀" for i in range(600)]  # More than one 256-row batch.
  datasets.Dataset.from_dict({"id": list(range(600)), "text": texts}).save_to_disk(
      str(tmp_path / "ds"))
  source = sources.resolve("hf", str(tmp_path / "ds"))
  assert (source.kind, source.files) == ("hf_disk", (str(tmp_path / "ds"),))
  assert list(sources.iter_documents(source)) == texts
  fp = sources.fingerprint(source)
  assert sources.fingerprint(sources.resolve("hf", str(tmp_path / "ds"))) == fp
  assert sources.total_bytes(source) == sum(
      os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(tmp_path / "ds") for n in ns)
  with pytest.raises(JaxlmError) as e:
    docs(tmp_path / "ds", text_field="body")
  one_line_error(e, "has no column 'body' (columns: id, text)")
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
      str(tmp_path / "dd"))
  with pytest.raises(JaxlmError) as e:
    sources.resolve("hf", str(tmp_path / "dd"))
  one_line_error(e, "holds a DatasetDict (splits: train)", str(tmp_path / "dd" / "train"))
  assert docs(tmp_path / "dd" / "train") == ["a"]
  datasets.Dataset.from_dict({"text": texts[:5]}).save_to_disk(str(tmp_path / "ds"))
  assert sources.fingerprint(sources.resolve("hf", str(tmp_path / "ds"))) != fp
  datasets.Dataset.from_dict({"text": ["a", None, "b"]}).save_to_disk(str(tmp_path / "nulls"))
  with pytest.raises(JaxlmError) as e:
    docs(tmp_path / "nulls")
  one_line_error(e, f"{tmp_path / 'nulls'}: row 2: 'text' is null")
  assert docs(tmp_path / "nulls", on_bad_record="skip") == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Fingerprints.
# ---------------------------------------------------------------------------------------------


def test_fingerprint_changes_with_the_files_and_only_then(tmp_path):
  a = write(tmp_path / "a.jsonl", jsonl({"text": "one"}))
  fp = lambda **kw: sources.fingerprint(sources.resolve("s", str(tmp_path / "*"), **kw))
  first = fp()
  assert len(first) == 64 and int(first, 16) >= 0
  assert fp() == first == fp(on_bad_record="skip")
  assert sources.fingerprint(sources.resolve("other-name", str(tmp_path / "*"))) == first
  assert fp(text_field="body") != first
  st = os.stat(a)
  os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # Same bytes, new mtime.
  second = fp()
  assert second != first
  write(a, jsonl({"text": "two"}))  # Same size.
  os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # Same mtime too: unnoticed, as said.
  assert fp() == second
  write(a, jsonl({"text": "three"}))  # Size changes.
  os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
  third = fp()
  assert third not in (first, second)
  write(tmp_path / "b.jsonl", jsonl({"text": "new file"}))
  assert fp() != third


# ---------------------------------------------------------------------------------------------
# gs://, on a GCS emulator.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs():
  """gs://jaxlm-sources on a GCS emulator in this process (workdir_test.py starts it alike)."""
  with pytest.MonkeyPatch.context() as mp:
    server, _ = start_gcs_emulator(mp, "jaxlm-sources")
    yield "gs://jaxlm-sources"
    server.stop()


def test_gs_sources_glob_read_and_fingerprint(gcs, tmp_path):
  root = f"{gcs}/corpus"
  for name, records in (("b.jsonl.gz", [{"text": "c"}]), ("a.jsonl.gz", [{"text": "a"},
                                                                        {"text": "b"}])):
    workdir_lib.write_bytes(f"{root}/{name}", gzip.compress(jsonl(*records).encode()))
  workdir_lib.write_text(f"{root}/notes.txt", "not matched")
  source = sources.resolve("web", f"{root}/*.jsonl.gz")
  assert source.files == (f"{root}/a.jsonl.gz", f"{root}/b.jsonl.gz")
  assert list(sources.iter_documents(source)) == ["a", "b", "c"]
  assert sources.total_bytes(source) == sum(workdir_lib.path(f).stat().length
                                            for f in source.files)
  fp = sources.fingerprint(source)
  assert sources.fingerprint(sources.resolve("web", f"{root}/*.jsonl.gz")) == fp
  workdir_lib.write_bytes(f"{root}/b.jsonl.gz", gzip.compress(jsonl({"text": "longer"}).encode()))
  assert sources.fingerprint(sources.resolve("web", f"{root}/*.jsonl.gz")) != fp
  local = write_parquet(tmp_path / "p.parquet", {"text": [str(i) for i in range(20)]})
  with open(local, "rb") as f:
    workdir_lib.write_bytes(f"{root}/p/p.parquet", f.read())
  assert docs(f"{root}/p/p.parquet") == [str(i) for i in range(20)]
  assert docs(f"{root}/notes.txt") == ["not matched"]
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", f"{root}/*.nothing")
  one_line_error(e, "no file matches", f"{root}/*.nothing")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", f"{root}/**/*.txt")
  one_line_error(e, "** is not supported on gs://")
  workdir_lib.write_text(f"{root}/ds/state.json", "{}")
  with pytest.raises(JaxlmError) as e:
    sources.resolve("web", f"{root}/ds")
  one_line_error(e, f"{root}/ds is a saved dataset on gs://; hf_disk sources must be local")
