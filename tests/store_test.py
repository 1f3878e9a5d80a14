"""The sharded token store: round trips, resume after a kill, refusals, damage found at open."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import start_gcs_emulator

from jaxlm.corpus import store as store_lib
from jaxlm.corpus.store import Store
from jaxlm.corpus.store_writer import StoreWriter
from jaxlm.errors import JaxlmError

EOT = 0
VOCAB = 1000
TOKENIZER = {"kind": "bpe", "merges": [[1, 2], [3, 4]], "vocab_size": VOCAB}
SOURCES = [("web", "sha256:aaaa"), ("books", "sha256:bbbb")]


def _docs(n_per_source=(40, 25), seed=0, vocab=VOCAB, max_len=30):
  """Documents in the producer's order: all of source 0, then all of source 1."""
  rng = np.random.default_rng(seed)
  docs = []
  for source, n in enumerate(n_per_source):
    for _ in range(n):
      length = int(rng.integers(1, max_len))
      tokens = np.append(rng.integers(1, vocab, size=length - 1), EOT)
      docs.append((source, tokens, int(rng.integers(0, 200))))
  return docs


def _writer(directory, **overrides):
  kwargs = dict(vocab_size=VOCAB, tokenizer=TOKENIZER, sources=SOURCES, eot_id=EOT,
                shard_tokens=100)
  return StoreWriter(directory, **{**kwargs, **overrides})


def _feed(writer, docs, skip=None):
  """Adds `docs`, skipping the first skip[s] documents of each source s (a resume point)."""
  seen = [0] * len(SOURCES)
  for source, tokens, nbytes in docs:
    seen[source] += 1
    if skip is None or seen[source] > skip[source]:
      writer.add(source, tokens, nbytes)


def _write(directory, docs, **overrides) -> dict:
  w = _writer(directory, **overrides)
  _feed(w, docs)
  return w.close()


def _files(directory) -> dict[str, bytes]:
  return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def _one_line(e: pytest.ExceptionInfo, *fragments: str) -> str:
  text = str(e.value)
  assert "\n" not in text, text
  for fragment in fragments:
    assert fragment in text, text
  return text


# ---------------------------------------------------------------------------------------------
# Writing and reading.
# ---------------------------------------------------------------------------------------------


def test_round_trip_across_shard_boundaries(tmp_path):
  docs = _docs()
  manifest = _write(tmp_path / "s", docs)
  shards = manifest["shards"]
  assert len(shards) > 5
  # A shard closes after the document that makes it reach shard_tokens; only the last is short.
  assert all(s["tokens"] >= 100 for s in shards[:-1])
  store = Store.open(tmp_path / "s", verify=True)
  assert store.num_documents == len(docs)
  assert store.num_tokens == sum(len(t) for _, t, _ in docs)
  for i, (source, tokens, _) in enumerate(docs):
    np.testing.assert_array_equal(store.document(i), tokens)
    assert store.documents["source"][i] == source
  assert store.tokenizer == TOKENIZER and store.eot_id == EOT and store.vocab_size == VOCAB
  assert [(s["name"], s["fingerprint"]) for s in store.sources] == SOURCES
  np.testing.assert_array_equal(store.source_documents(0), np.arange(40))
  np.testing.assert_array_equal(store.source_documents(1), np.arange(40, 65))
  assert sorted(os.listdir(tmp_path / "s")) == sorted(
      ["manifest.json"] + [f"{s['name']}.{e}" for s in shards for e in ("bin", "idx")])


def test_shard_closes_exactly_at_shard_tokens_and_no_empty_last_shard(tmp_path):
  docs = [(0, np.array([5, 6, 7, 8, EOT]), 9)] * 4
  manifest = _write(tmp_path / "s", docs, shard_tokens=10)
  assert [s["tokens"] for s in manifest["shards"]] == [10, 10]
  assert [s["documents"] for s in manifest["shards"]] == [2, 2]


def test_empty_store(tmp_path):
  manifest = _write(tmp_path / "s", [])
  assert manifest["shards"] == [] and manifest["totals"]["tokens"] == 0
  store = Store.open(tmp_path / "s")
  assert store.num_tokens == 0 and store.num_documents == 0
  assert store.tokens(0, 0).shape == (0,)


@pytest.mark.parametrize("vocab,dtype", [(256, np.uint16), (65536, np.uint16),
                                         (65537, np.uint32), (200_000, np.uint32)])
def test_dtype_fits_the_vocab(tmp_path, vocab, dtype):
  docs = [(0, np.array([vocab - 1, 1, EOT]), 3), (1, np.array([vocab // 2, EOT]), 2)]
  manifest = _write(tmp_path / "s", docs, vocab_size=vocab)
  assert manifest["dtype"] == np.dtype(dtype).name
  assert os.path.getsize(tmp_path / "s" / "tokens-00000.bin") == 5 * np.dtype(dtype).itemsize
  raw = np.fromfile(tmp_path / "s" / "tokens-00000.bin", dtype=np.dtype(dtype).newbyteorder("<"))
  np.testing.assert_array_equal(raw, [vocab - 1, 1, EOT, vocab // 2, EOT])
  store = Store.open(tmp_path / "s")
  assert store.dtype == dtype
  np.testing.assert_array_equal(store.tokens(0, 5), [vocab - 1, 1, EOT, vocab // 2, EOT])


def test_manifest_counts_per_source(tmp_path):
  docs = _docs()
  manifest = _write(tmp_path / "s", docs)
  for i, (name, fingerprint) in enumerate(SOURCES):
    mine = [(t, b) for s, t, b in docs if s == i]
    assert manifest["sources"][i] == {
        "name": name, "fingerprint": fingerprint, "documents": len(mine),
        "tokens": sum(len(t) for t, _ in mine), "text_bytes": sum(b for _, b in mine)}
  assert manifest["totals"] == {"documents": len(docs), "tokens": sum(len(t) for _, t, _ in docs),
                                "text_bytes": sum(b for *_, b in docs)}
  assert manifest["format_version"] == store_lib.FORMAT_VERSION and manifest["eot_id"] == EOT
  assert sum(s["tokens"] for s in manifest["shards"]) == manifest["totals"]["tokens"]
  assert json.loads(open(tmp_path / "s" / "manifest.json").read()) == manifest


def test_token_spans_across_shards_equal_the_concatenation(tmp_path):
  docs = _docs()
  _write(tmp_path / "s", docs)
  store = Store.open(tmp_path / "s")
  flat = np.concatenate([t for _, t, _ in docs])
  n = len(flat)
  offsets = np.cumsum([s["tokens"] for s in store.manifest["shards"]])
  spans = [(0, n), (0, 1), (n - 1, n), (n, n)]
  spans += [(int(o) - 1, int(o) + 1) for o in offsets[:-1]]  # Straddling each boundary.
  spans += [(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
  rng = np.random.default_rng(1)
  spans += [tuple(sorted(rng.integers(0, n + 1, size=2).tolist())) for _ in range(200)]
  for a, b in spans:
    np.testing.assert_array_equal(store.tokens(a, b), flat[a:b], err_msg=f"[{a}, {b})")
  with pytest.raises(JaxlmError) as e:
    store.tokens(0, n + 1)
  _one_line(e, "outside")


# ---------------------------------------------------------------------------------------------
# Resume.
# ---------------------------------------------------------------------------------------------


def _interrupted(directory, docs, n_docs):
  """Adds the first n_docs documents and abandons the writer without close (like a crash)."""
  w = _writer(directory)
  _feed(w, docs[:n_docs])
  shards = w.num_shards
  del w
  return shards


def test_resume_after_an_abandoned_writer_is_byte_identical(tmp_path):
  docs = _docs()
  _write(tmp_path / "full", docs)
  shards = _interrupted(tmp_path / "cut", docs, 50)  # Into source 1, mid-shard.
  assert shards >= 2
  assert os.path.exists(tmp_path / "cut" / f"{store_lib.shard_name(shards)}.bin.partial")
  assert not os.path.exists(tmp_path / "cut" / "manifest.json")
  w = _writer(tmp_path / "cut")
  point = w.resume_point()
  assert w.num_shards == shards and not w.complete
  # The resume point counts exactly the documents of the complete shards.
  stored = sum(s["documents"] for s in w._shards)
  assert point == [min(stored, 40), max(stored - 40, 0)] and 0 < stored < 50
  _feed(w, docs, skip=point)
  w.close()
  assert _files(tmp_path / "cut") == _files(tmp_path / "full")


def test_resume_from_a_copy_taken_mid_write(tmp_path):
  """A directory copied while the writer runs is what a kill would leave at that moment."""
  docs = _docs()
  _write(tmp_path / "full", docs)
  w = _writer(tmp_path / "live")
  copies = []
  for i, (source, tokens, nbytes) in enumerate(docs):
    w.add(source, tokens, nbytes)
    if i in (0, 7, 33, 41, 64):
      shutil.copytree(tmp_path / "live", tmp_path / f"copy{i}")
      copies.append(tmp_path / f"copy{i}")
  w.close()
  for copy in copies:
    w = _writer(copy)
    _feed(w, docs, skip=w.resume_point())
    w.close()
    assert _files(copy) == _files(tmp_path / "full"), copy


def test_leftover_partial_files_are_removed_on_resume(tmp_path):
  docs = _docs()
  _write(tmp_path / "full", docs)
  shards = _interrupted(tmp_path / "cut", docs, 50)
  d = tmp_path / "cut"
  # A kill between the two renames leaves a complete .bin without its .idx, and a kill while
  # writing the index leaves an .idx.partial: neither counts as a complete shard.
  name = store_lib.shard_name(shards)
  os.replace(d / f"{name}.bin.partial", d / f"{name}.bin")
  (d / f"{name}.idx.partial").write_bytes(b"\x01" * 20)
  (d / "manifest.json.partial").write_bytes(b"{")
  w = _writer(d)
  assert w.num_shards == shards
  assert sorted(os.listdir(d)) == sorted(
      ["writer.json"] + [f"{store_lib.shard_name(i)}.{e}" for i in range(shards)
                         for e in ("bin", "idx")])
  _feed(w, docs, skip=w.resume_point())
  w.close()
  assert _files(d) == _files(tmp_path / "full")


def test_reopening_a_complete_store_adds_nothing(tmp_path):
  docs = _docs()
  manifest = _write(tmp_path / "s", docs)
  before = _files(tmp_path / "s")
  w = _writer(tmp_path / "s")
  assert w.complete and w.resume_point() == [40, 25]
  assert w.close() == manifest
  with pytest.raises(JaxlmError) as e:
    w.add(0, np.array([EOT]), 1)
  _one_line(e, "complete")
  assert _files(tmp_path / "s") == before


@pytest.mark.parametrize("finished", [False, True])
@pytest.mark.parametrize("change,fragment", [
    (dict(tokenizer={**TOKENIZER, "merges": [[1, 2]]}), "tokenizer differs (in 'merges')"),
    (dict(sources=[SOURCES[0], ("books", "sha256:cccc")]),
     "source 1 ('books') has fingerprint 'sha256:bbbb' there, 'sha256:cccc' now"),
    (dict(sources=SOURCES[:1]), "it has 2 sources, 1 now"),
    (dict(shard_tokens=101), "shard_tokens is 100, 101 now"),
    (dict(eot_id=1), "eot_id is 0, 1 now"),
])
def test_refuses_a_store_written_differently(tmp_path, finished, change, fragment):
  docs = _docs()
  d = tmp_path / "s"
  if finished:
    _write(d, docs)
  else:
    _interrupted(d, docs, 50)
  before = _files(d)
  with pytest.raises(JaxlmError) as e:
    _writer(d, **change)
  _one_line(e, fragment, "rebuild=True", "delete the directory")
  assert _files(d) == before  # Nothing deleted.
  # rebuild=True deletes that store and writes the new one.
  w = _writer(d, rebuild=True, **change)
  assert w.resume_point() == [0] * len(w.header["sources"]) and not w.complete
  assert sorted(os.listdir(d)) == ["writer.json"]


def test_refuses_a_directory_that_is_not_a_store(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(JaxlmError) as e:
    _writer(tmp_path)
  _one_line(e, "not a token store", "notes.txt")
  with pytest.raises(JaxlmError) as e:
    _writer(tmp_path, rebuild=True)
  assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Checks at write and at open.
# ---------------------------------------------------------------------------------------------


def test_add_checks_the_document(tmp_path):
  w = _writer(tmp_path / "s")
  for args, fragment in [
      ((0, np.array([5, 6]), 1), "must end with the end-of-text id 0, this one ends with 6"),
      ((0, np.array([VOCAB, EOT]), 1), f"token id {VOCAB} is outside the vocab"),
      ((0, np.array([-1, EOT]), 1), "token id -1 is outside"),
      ((0, np.array([], dtype=np.int32), 0), "non-empty 1-D integer array"),
      ((0, np.array([1.0, 0.0]), 1), "non-empty 1-D integer array"),
      ((2, np.array([EOT]), 1), "source_index=2"),
      ((0, np.array([EOT]), -1), "text_bytes"),
  ]:
    with pytest.raises(JaxlmError) as e:
      w.add(*args)
    _one_line(e, fragment)
  assert w.close()["totals"]["documents"] == 0


def test_truncated_or_damaged_shard_is_found_at_open(tmp_path):
  _write(tmp_path / "s", _docs())
  bin_path = tmp_path / "s" / "tokens-00002.bin"
  data = bin_path.read_bytes()
  bin_path.write_bytes(data[:-2])
  with pytest.raises(JaxlmError) as e:
    Store.open(tmp_path / "s")
  _one_line(e, "tokens-00002.bin is", f"{len(data) - 2} bytes", f"says {len(data)} bytes")
  bin_path.unlink()
  with pytest.raises(JaxlmError) as e:
    Store.open(tmp_path / "s")
  _one_line(e, "tokens-00002.bin is missing")
  # Same size, one byte changed: only the checksum sees it.
  bin_path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
  Store.open(tmp_path / "s")
  with pytest.raises(JaxlmError) as e:
    Store.open(tmp_path / "s", verify=True)
  _one_line(e, "tokens-00002.bin fails its sha256")


def test_unknown_format_version_is_refused(tmp_path):
  _write(tmp_path / "s", _docs())
  path = tmp_path / "s" / "manifest.json"
  manifest = json.loads(path.read_text())
  path.write_text(json.dumps({**manifest, "format_version": 99}))
  with pytest.raises(JaxlmError) as e:
    Store.open(tmp_path / "s")
  _one_line(e, "format version 99", "reads version 1")


def test_open_says_when_a_write_is_unfinished(tmp_path):
  _interrupted(tmp_path / "s", _docs(), 50)
  with pytest.raises(JaxlmError) as e:
    Store.open(tmp_path / "s")
  _one_line(e, "manifest.json is missing", "unfinished write")
  with pytest.raises(JaxlmError) as e:
    Store.open(tmp_path / "nothing")
  _one_line(e, "no token store")


# ---------------------------------------------------------------------------------------------
# A real kill -9.
# ---------------------------------------------------------------------------------------------

# Both processes build the same documents from this source.
_KILL_DOCS = textwrap.dedent("""
    import numpy as np
    def kill_docs():
      rng = np.random.default_rng(7)
      for i in range(3000):
        tokens = np.append(rng.integers(1, 50000, size=int(rng.integers(1, 300))), 0)
        yield i % 2, tokens, 4 * len(tokens)
""")

_CHILD = _KILL_DOCS + textwrap.dedent("""
    import sys
    from jaxlm.corpus.store_writer import StoreWriter
    w = StoreWriter(sys.argv[1], vocab_size=50000, tokenizer={"t": 1}, eot_id=0,
                    sources=[("a", "1"), ("b", "2")], shard_tokens=20000)
    in_flight, shards = 0, 0
    for source, tokens, nbytes in kill_docs():
      w.add(source, tokens, nbytes)
      if w.num_shards > shards:
        shards = w.num_shards
        print("shard", shards, "complete", flush=True)
      if shards < 3:
        continue
      in_flight += len(tokens)
      if in_flight > 10000:  # Half of the 4th shard written (past the 8 KiB file buffer).
        print("partial", flush=True)
        sys.stdin.readline()  # Waits here to be killed.
    w.close()
""")


def test_kill_9_mid_shard_then_resume_is_byte_identical(tmp_path):
  namespace = {}
  exec(_KILL_DOCS, namespace)
  docs = list(namespace["kill_docs"]())
  kwargs = dict(vocab_size=50000, tokenizer={"t": 1}, eot_id=0, sources=[("a", "1"), ("b", "2")],
                shard_tokens=20000)
  full = StoreWriter(tmp_path / "full", **kwargs)
  for doc in docs:
    full.add(*doc)
  assert len(full.close()["shards"]) > 5
  d = tmp_path / "killed"
  child = subprocess.Popen([sys.executable, "-c", _CHILD, str(d)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
  try:
    for line in child.stdout:
      if line.strip() == "partial":
        break
    else:
      pytest.fail(f"the child ended (rc {child.wait()}) before writing a partial shard")
    assert os.path.getsize(d / "tokens-00003.bin.partial") > 0
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
  finally:
    child.kill()
    child.wait()
  assert not os.path.exists(d / "manifest.json")
  w = StoreWriter(d, **kwargs)
  assert w.num_shards == 3
  point = w.resume_point()
  assert sum(point) == sum(s["documents"] for s in w._shards)
  seen = [0, 0]
  for source, tokens, nbytes in docs:
    seen[source] += 1
    if seen[source] > point[source]:
      w.add(source, tokens, nbytes)
  w.close()
  assert _files(d) == _files(tmp_path / "full")


# ---------------------------------------------------------------------------------------------
# gs:// (a local GCS emulator, as in workdir_test.py).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs():
  """gs://jaxlm-store-test on gcp-storage-emulator in this process; yields the bucket URL."""
  with pytest.MonkeyPatch.context() as mp:
    server, _ = start_gcs_emulator(mp, "jaxlm-store-test")
    yield "gs://jaxlm-store-test"
    server.stop()


def test_gcs_store_is_read_through_a_local_cache(tmp_path, gcs):
  from jaxlm import workdir as workdir_lib
  docs = _docs()
  _write(tmp_path / "s", docs)
  remote = f"{gcs}/store"
  for name in os.listdir(tmp_path / "s"):
    workdir_lib.write_bytes(f"{remote}/{name}", (tmp_path / "s" / name).read_bytes())
  store = Store.open(remote, verify=True, cache_dir=str(tmp_path / "cache"))
  np.testing.assert_array_equal(store.tokens(0, store.num_tokens),
                                np.concatenate([t for _, t, _ in docs]))
  assert store.sources == Store.open(tmp_path / "s").sources
  (copy,) = os.listdir(tmp_path / "cache")  # Keyed by the manifest's sha256.
  assert sorted(os.listdir(tmp_path / "cache" / copy)) == sorted(
      n for n in os.listdir(tmp_path / "s") if n != "manifest.json")
  Store.open(remote, cache_dir=str(tmp_path / "cache"))  # Reuses the copy.
  with pytest.raises(JaxlmError) as e:
    _writer(remote)
  _one_line(e, "local directories")
  # A truncated remote shard is caught (after download) like a local one.
  workdir_lib.write_bytes(f"{remote}/tokens-00001.bin", b"\x00\x00")
  with pytest.raises(JaxlmError) as e:
    Store.open(remote, cache_dir=str(tmp_path / "cache2"))
  _one_line(e, "tokens-00001.bin is 2 bytes")


def test_tokenizer_must_be_json(tmp_path):
  with pytest.raises(JaxlmError) as e:
    _writer(tmp_path / "s", tokenizer={"merges": {1, 2}})
  _one_line(e, "tokenizer dict must be JSON")


def test_a_write_killed_before_its_first_shard_starts_afresh(tmp_path):
  d = tmp_path / "s"
  d.mkdir()
  (d / "writer.json.partial").write_bytes(b'{"form')  # Killed while writing the header.
  (d / "tokens-00000.bin.partial").write_bytes(b"\x01\x00")
  docs = _docs()
  w = _writer(d)
  assert w.resume_point() == [0, 0] and sorted(os.listdir(d)) == ["writer.json"]
  _feed(w, docs)
  w.close()
  _write(tmp_path / "full", docs)
  assert _files(d) == _files(tmp_path / "full")
