"""data.sources end to end: prepare -> train/val token stores -> mixture rows -> per-source eval.

The pieces below prepare (sources.py, store.py, store_writer.py) have their own tests; these
check what a user of `jaxlm prepare` / `jaxlm train` with data.sources relies on.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, load_config, run_jaxlm, start_gcs_emulator

from jaxlm import config as config_lib
from jaxlm import tokenizers
from jaxlm.corpus import prepare as prepare_lib
from jaxlm.corpus import spec as spec_lib
from jaxlm.errors import JaxlmError

SMOKE = os.path.join(REPO, "configs", "smoke.py")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def write_jsonl(path, n_docs, seed, words=WORDS, field="text"):
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(n_docs):
      n = int(rng.integers(5, 60))
      f.write(json.dumps({field: " ".join(rng.choice(words, size=n))}) + "\n")
  return str(path)


def two_source_config(tmp_path, *, tokenizer="byte", rows="documents", store="", **weights):
  """A tiny model on two JSONL sources (web: Greek letters, code: digits), mixed 3:1."""
  web = write_jsonl(tmp_path / "web.jsonl", 300, 0)
  code = write_jsonl(tmp_path / "code.jsonl", 200, 1, words=[str(i) * 3 for i in range(10)])
  c = load_config("smoke")
  c.data.sources.web = ml_collections.ConfigDict(dict(path=web, weight=weights.get("web", 3.0)))
  c.data.sources.code = ml_collections.ConfigDict(dict(path=code,
                                                       weight=weights.get("code", 1.0)))
  c.data.tokenizer, c.data.rows = tokenizer, rows
  c.data.vocab_size, c.data.bpe_sample_mb = 300, 1
  c.data.store = store or str(tmp_path / "store")
  c.model.block_size = 32
  return c


def files_of(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def load(cfg, **kw):
  return config_lib.load_dataset(cfg, log=lambda _: None, **kw)


# -- the store and its documents ---------------------------------------------------------------

def test_documents_end_with_eot_and_held_out_documents_are_spread(tmp_path):
  cfg = two_source_config(tmp_path)
  data = load(cfg)
  tok = data.tokenizer
  assert tok.eot_id == 256 and tok.vocab_size == 257  # A reserved id after the 256 bytes.
  web_docs = [json.loads(line)["text"] for line in open(tmp_path / "web.jsonl")]
  train, val = data.train.store, data.val.store
  w = data.names.index("web")  # Sources are in the order of the config's keys (sorted).
  for store in (train, val):
    for i in range(store.num_documents):
      assert store.document(i)[-1] == tok.eot_id
  # Every web document is in exactly one split, in order, with its exact bytes.
  got = [bytes(store.document(i)[:-1].astype(np.uint8)).decode()
         for store in (train, val) for i in store.source_documents(w)]
  assert sorted(got) == sorted(web_docs)
  held = [prepare_lib.is_held_out("web", i, cfg.data.val_fraction) for i in range(len(web_docs))]
  assert [d for d, h in zip(web_docs, held, strict=True) if h] == [
      bytes(val.document(i)[:-1].astype(np.uint8)).decode() for i in val.source_documents(w)]
  # Held out from the whole source, not its tail: some in each half.
  idx = np.flatnonzero(held)
  assert 0.05 < len(idx) / len(web_docs) < 0.16 and idx.min() < 150 < idx.max()
  assert train.sources[w]["text_bytes"] + val.sources[w]["text_bytes"] == sum(
      len(d.encode()) for d in web_docs)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_char_and_bpe_stores_end_documents_with_their_eot(tmp_path, kind):
  data = load(two_source_config(tmp_path, tokenizer=kind))
  tok = data.tokenizer
  assert tok.eot_id == tok.vocab_size - 1
  doc = data.train.store.document(0)  # The first of "code", the first source by name.
  assert doc[-1] == tok.eot_id and tok.eot_id not in doc[:-1]
  first = json.loads(open(tmp_path / "code.jsonl").readline())["text"]
  if not prepare_lib.is_held_out("code", 0, 0.1):
    assert tok.decode(doc[:-1]) == first
  assert tok.decode(doc).endswith(tokenizers.EOT_TOKEN)
  # Bits per byte counts each token's UTF-8 bytes: the table sums to the text's size.
  assert tok.token_bytes()[doc].sum() == len(tok.decode(doc[:-1]).encode())


def test_bpe_learns_from_a_bounded_deterministic_sample(tmp_path):
  cfg = two_source_config(tmp_path, tokenizer="bpe")
  spec = spec_lib.from_config(cfg)
  spec = spec_lib.DataSpec(**{**spec.__dict__, "bpe_sample_bytes": 4000})
  resolved = spec_lib.resolve(spec)
  sample = prepare_lib.bpe_sample(spec, resolved)
  size = sum(len(t.encode()) for t in sample)
  assert 4000 <= size < 4000 + 2 * 400  # The budget, plus at most the last document of each.
  assert sample == prepare_lib.bpe_sample(spec, resolved)
  web = sum(len(t.encode()) for t in sample if t[0].isalpha())
  assert 0.6 < web / size < 0.9  # Shares by weight, 3:1.


def test_a_second_load_reads_the_store_without_tokenizing(tmp_path, monkeypatch):
  cfg = two_source_config(tmp_path, tokenizer="bpe")
  first = load(cfg)
  before = files_of(tmp_path / "store")

  def fail(*a, **k):
    raise AssertionError("tokenized again")
  monkeypatch.setattr(prepare_lib, "_write", fail)
  monkeypatch.setattr(prepare_lib, "build_tokenizer", fail)
  second = load(cfg)
  assert second.tokenizer.to_json() == first.tokenizer.to_json()
  assert files_of(tmp_path / "store") == before


# -- rows --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", ["windows", "documents"])
def test_batches_are_the_same_on_1_2_and_4_processes(tmp_path, rows):
  data = load(two_source_config(tmp_path, rows=rows))
  kw = dict(seed=3, batch_size=8, block_size=32)
  for step in (0, 1, 17):
    whole = data.train_batch(step=step, **kw)
    for n in (2, 4):
      parts = [data.train_batch(step=step, process_index=i, process_count=n, **kw)
               for i in range(n)]
      for k in ("inputs", "targets"):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    for name, fn in data.eval_sets().items():
      whole = fn(step=step, **kw)
      parts = [fn(step=step, process_index=i, process_count=4, **kw) for i in range(4)]
      np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]),
                                    whole["inputs"], err_msg=name)
  a, b = data.train_batch(step=5, **kw), data.train_batch(step=6, **kw)
  assert not np.array_equal(a["inputs"], b["inputs"])
  np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])


def test_mixture_proportions_and_document_aligned_starts(tmp_path):
  data = load(two_source_config(tmp_path, rows="documents", web=3.0, code=1.0))
  sources, starts = zip(*(data.draw(data.train, data.weights, [0, 0, s], 480)
                          for s in range(20)), strict=True)
  sources, starts = np.concatenate(sources), np.concatenate(starts)
  n, p = len(sources), 0.75
  share = np.mean(sources == data.names.index("web"))
  assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n), share  # 4 sigma of a binomial.
  for s in (0, 1):
    mine = starts[sources == s]
    assert np.isin(mine, data.train.doc_starts[s]).all()  # Each row starts a document.
    assert (mine >= data.train.lo[s]).all() and (mine + 33 <= data.train.hi[s]).all()
  # Eval sets: val/<source> rows come from that source only.
  val_src, _ = data.draw(data.val, np.eye(2)[1], [0, 2, 2, 0], 64)
  assert (val_src == 1).all() and data.names == ["code", "web"]
  assert set(data.eval_sets()) == {"train", "val", "val/web", "val/code"}


def test_windows_start_anywhere_in_their_source(tmp_path):
  data = load(two_source_config(tmp_path, rows="windows"))
  sources, starts = data.draw(data.train, data.weights, [0, 0, 1], 4000)
  doc_starts = np.concatenate(data.train.doc_starts)
  assert np.mean(np.isin(starts, doc_starts)) < 0.2
  for s in (0, 1):
    mine = starts[sources == s]
    assert mine.min() >= data.train.lo[s] and mine.max() + 33 <= data.train.hi[s]


def test_mixture_log_reports_shares_and_epochs(tmp_path):
  data = load(two_source_config(tmp_path, web=3.0, code=1.0))
  code, web = data.mixture(steps=100, batch_size=8)
  tokens = data.train.tokens(data.names.index("web"))
  assert web.startswith("web 75.0% of rows") and f"{tokens:,} tokens" in web
  assert f"{100 * 8 * 32 * 0.75 / tokens:.3g} epochs" in web
  assert code.startswith("code 25.0% of rows")


# -- training and evaluation -------------------------------------------------------------------

@pytest.mark.slow
def test_training_reports_per_source_val_loss_and_bpb(tmp_path):
  cfg = two_source_config(tmp_path)
  cfg.train.steps, cfg.train.eval_every, cfg.train.eval_steps = 4, 4, 2
  from jaxlm import train
  final = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  for key in ("val/loss", "val/bpb", "val/web/loss", "val/web/bpb", "val/code/loss",
              "val/code/bpb"):
    assert np.isfinite(final[key]), key
  # A byte tokenizer: every target but end-of-text is one byte, so bpb follows from the loss.
  data = load(cfg)
  fn = data.eval_sets()["val/web"]
  targets = np.stack([fn(seed=cfg.seed, step=i, batch_size=cfg.train.batch_size,
                         block_size=32)["targets"] for i in range(2)])
  n_bytes = np.sum(targets != 256)
  expected = final["val/web/loss"] * targets.size / np.log(2) / n_bytes
  assert final["val/web/bpb"] == pytest.approx(expected, rel=1e-5)
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert any("val/code/bpb" in r for r in records)
  from jaxlm import runs
  result = runs.evaluate_run(str(tmp_path / "run"), eval_steps=2)
  assert result["val/web/loss"] == pytest.approx(final["val/web/loss"], rel=1e-6)


# -- kill -9, gs:// ----------------------------------------------------------------------------

_PREPARE_SCRIPT = """
import sys, ml_collections
sys.path.insert(0, {tests!r})
from conftest import load_config
from jaxlm.corpus import prepare, spec
c = load_config("smoke")
for name in ("a", "b"):
  c.data.sources[name] = ml_collections.ConfigDict(dict(path={root!r} + f"/{{name}}.jsonl"))
c.data.tokenizer, c.data.store = "bpe", sys.argv[1]
c.data.vocab_size, c.data.bpe_sample_mb = 400, 1
prepare.open_or_prepare(spec.from_config(c), shard_tokens=20_000, batch_bytes=20_000,
                        log=lambda m: print(m, flush=True))
"""


@pytest.mark.slow
def test_kill_9_during_prepare_then_rerun_gives_the_same_store(tmp_path):
  for name, seed in (("a", 0), ("b", 1)):
    write_jsonl(tmp_path / f"{name}.jsonl", 6000, seed)
  script = tmp_path / "prepare.py"
  script.write_text(_PREPARE_SCRIPT.format(tests=os.path.join(REPO, "tests"), root=str(tmp_path)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, script, tmp_path / "full"], check=True, env=env,
                 capture_output=True, timeout=300)
  proc = subprocess.Popen([sys.executable, script, tmp_path / "killed"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (tmp_path / "killed" / "train" / "tokens-00002.idx").exists():
    assert time.time() < deadline and proc.poll() is None, "prepare ended before the kill"
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "killed" / "train" / "manifest.json").exists()
  out = subprocess.run([sys.executable, script, tmp_path / "killed"], check=True, env=env,
                       capture_output=True, text=True, timeout=300)
  assert "resuming the unfinished store" in out.stdout
  assert files_of(tmp_path / "killed") == files_of(tmp_path / "full")


def test_a_store_on_gcs_reads_the_same_rows(tmp_path):
  from jaxlm import workdir as workdir_lib
  cfg = two_source_config(tmp_path)
  local = load(cfg)
  with pytest.MonkeyPatch.context() as mp:
    server, _ = start_gcs_emulator(mp, "jaxlm-corpus-test")
    try:
      for rel in files_of(tmp_path / "store"):
        workdir_lib.write_bytes(f"gs://jaxlm-corpus-test/s/{rel}",
                                (tmp_path / "store" / rel).read_bytes())
      cfg.data.store = "gs://jaxlm-corpus-test/s"
      cfg.data.cache_dir = str(tmp_path / "cache")
      remote = load(cfg)
      for pi in (0, 1):  # Each of two hosts reads its own rows of the same batches.
        kw = dict(seed=0, step=3, batch_size=8, block_size=32, process_index=pi,
                  process_count=2)
        np.testing.assert_array_equal(remote.train_batch(**kw)["inputs"],
                                      local.train_batch(**kw)["inputs"])
      # On a host without the sources (a pod slice's), the complete store is used as it is.
      os.rename(tmp_path / "web.jsonl", tmp_path / "web.moved")
      logged = []
      away = config_lib.load_dataset(cfg, log=logged.append)
      assert any("using the prepared store" in m for m in logged), logged
      np.testing.assert_array_equal(away.train_batch(**kw)["inputs"],
                                    local.train_batch(**kw)["inputs"])
      os.rename(tmp_path / "web.moved", tmp_path / "web.jsonl")
      # A store on gs:// prepared from other sources is refused, not silently used.
      write_jsonl(tmp_path / "code.jsonl", 10, 7)
      with pytest.raises(JaxlmError) as e:
        load(cfg)
      assert "source 'code'" in str(e.value) and "\n" not in str(e.value)
    finally:
      server.stop()


# -- bad input ---------------------------------------------------------------------------------

def one_line(exc_info, *fragments):
  message = str(exc_info.value)
  assert "\n" not in message, message
  for f in fragments:
    assert f in message, message


@pytest.mark.parametrize("change, fragments", [
    (lambda c, t: setattr(c.data.sources.web, "weight", -1.0), ["weight=-1.0 is negative"]),
    (lambda c, t: (setattr(c.data.sources.web, "weight", 0.0),
                   setattr(c.data.sources.code, "weight", 0.0)), ["every data.sources weight"]),
    (lambda c, t: setattr(c.data.sources.web, "path", str(t / "nothing*.jsonl")),
     ["source 'web'", "no file matches"]),
    (lambda c, t: setattr(c.data, "rows", "lines"), ["data.rows='lines'"]),
    (lambda c, t: setattr(c.data, "path", "x.txt"), ["data.path='x.txt' and data.sources"]),
])
def test_bad_config_is_one_line_before_anything_is_read(tmp_path, change, fragments):
  cfg = two_source_config(tmp_path)
  change(cfg, tmp_path)
  with pytest.raises(JaxlmError) as e:
    config_lib.validate_config(cfg)
    load(cfg)
  one_line(e, *fragments)
  assert not (tmp_path / "store").exists()


def test_bad_records_name_file_and_line_or_are_skipped_and_counted(tmp_path):
  cfg = two_source_config(tmp_path)
  with open(tmp_path / "web.jsonl", "a") as f:
    f.write("{not json\n")
    f.write(json.dumps({"body": "no text field"}) + "\n")
  with pytest.raises(JaxlmError) as e:
    load(cfg)
  one_line(e, "web.jsonl:301: not JSON", "on_bad_record='skip'")
  cfg.data.on_bad_record = "skip"
  logged = []
  data = config_lib.load_dataset(cfg, log=logged.append)
  assert any("skipped 2 bad records" in m for m in logged), logged
  assert data.train.store.num_documents + data.val.store.num_documents == 500


def test_a_source_with_no_documents(tmp_path):
  cfg = two_source_config(tmp_path)
  (tmp_path / "code.jsonl").write_text("\n\n")
  with pytest.raises(JaxlmError) as e:
    load(cfg)
  one_line(e, "source 'code'", "has no documents")


def test_a_source_too_small_to_hold_out_documents(tmp_path):
  cfg = two_source_config(tmp_path)
  write_jsonl(tmp_path / "code.jsonl", 3, 5)
  with pytest.raises(JaxlmError) as e:
    load(cfg)
  one_line(e, "source 'code' has no validation documents", "val_path")
  cfg.data.sources.code.val_path = write_jsonl(tmp_path / "code-val.jsonl", 30, 6)
  cfg.data.store = str(tmp_path / "store2")
  data = load(cfg)
  assert data.val.store.sources[0]["documents"] == 30  # All of val_path, none held out.
  assert data.train.store.sources[0]["documents"] == 3


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
  cfg = two_source_config(tmp_path)
  (tmp_path / "p.parquet").write_bytes(b"PAR1")
  cfg.data.sources.code.path = str(tmp_path / "p.parquet")
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(JaxlmError) as e:
    load(cfg)
  one_line(e, "Parquet", "pip install 'jaxlm[data]'")


@pytest.mark.parametrize("what", ["tokenizer", "source"])
def test_a_store_from_another_tokenizer_or_changed_source_is_refused_intact(tmp_path, what):
  cfg = two_source_config(tmp_path)
  first = load(cfg)
  before = files_of(tmp_path / "store")
  if what == "tokenizer":
    cfg.data.tokenizer, fragment = "char", "another tokenizer"
  else:
    write_jsonl(tmp_path / "web.jsonl", 301, 0)
    fragment = "source 'web' as it was before it changed"
  with pytest.raises(JaxlmError) as e:
    load(cfg)
  one_line(e, fragment, "jaxlm prepare --rebuild")
  assert files_of(tmp_path / "store") == before  # Nothing prepared was touched.
  if what == "source":
    # --rebuild replaces it; the cache directory form keys stores by sources instead.
    rebuilt = load(cfg, rebuild=True)
    assert rebuilt.train.store.num_documents + rebuilt.val.store.num_documents == 501
    cfg.data.store = ""
    cfg.data.cache_dir = str(tmp_path / "cache")
    assert load(cfg).directory.startswith(str(tmp_path / "cache"))
  del first


def test_prepare_cli_progress_and_errors(tmp_path):
  cfg_path = tmp_path / "cfg.py"
  write_jsonl(tmp_path / "web.jsonl", 200, 0)
  cfg_path.write_text(
      "import sys\n"
      "from jaxlm import defaults\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      "from conftest import load_config\n"
      "def get_config():\n"
      "  c = load_config('smoke')\n"
      f"  c.data.sources.web = defaults.source({str(tmp_path)!r} + '/web.jsonl')\n"
      f"  c.data.store = {str(tmp_path / 'store')!r}\n"
      "  c.data.tokenizer = 'byte'\n"
      "  return c\n")
  proc = run_jaxlm("prepare", f"--config={cfg_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "100.0%) | 200 documents" in proc.stderr and "MB/s" in proc.stderr
  assert "ETA" in proc.stderr and "tokens/s" in proc.stderr
  bad = run_jaxlm("prepare", f"--config={cfg_path}", "--config.data.sources.web.weight=-2")
  assert_one_line_error(bad, "data.sources.web.weight=-2.0 is negative")
  none = run_jaxlm("prepare", f"--config={os.path.join(REPO, 'configs', 'smoke.py')}")
  assert_one_line_error(none, "jaxlm prepare reads data.sources")


def write_cli_config(tmp_path, store, cache_dir=""):
  """A config file for `jaxlm` commands: two_source_config's sources, the given store."""
  path = tmp_path / "cli_config.py"
  path.write_text(
      "import importlib.util\n"
      "from jaxlm import defaults\n"
      # Not conftest's load_config: importing conftest would set XLA_FLAGS in the children.
      f"spec = importlib.util.spec_from_file_location('smoke', {SMOKE!r})\n"
      "smoke = importlib.util.module_from_spec(spec)\n"
      "spec.loader.exec_module(smoke)\n"
      "def get_config():\n"
      "  c = smoke.get_config()\n"
      f"  c.data.sources.web = defaults.source({str(tmp_path / 'web.jsonl')!r}, weight=3.0)\n"
      f"  c.data.sources.code = defaults.source({str(tmp_path / 'code.jsonl')!r})\n"
      f"  c.data.tokenizer, c.data.rows, c.data.store = 'byte', 'documents', {store!r}\n"
      f"  c.data.cache_dir = {cache_dir!r}\n"
      "  c.model.block_size = 32\n"
      "  c.train.steps, c.train.eval_every, c.train.eval_steps = 6, 3, 2\n"
      "  return c\n")
  return str(path)


@pytest.mark.slow
def test_two_hosts_train_from_a_store_on_gcs_like_one_from_a_local_store(tmp_path):
  from jaxlm import workdir as workdir_lib
  cfg = two_source_config(tmp_path)
  load(cfg)  # Prepared locally, then copied up.

  def losses(workdir):
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {(r["step"], k): v for r in records for k, v in r.items()
            if k in ("train/loss", "val/loss", "val/web/bpb", "val/code/loss")}

  one = tmp_path / "one"
  proc = run_jaxlm("launch", "--num_processes=1", "--devices_per_process=4", "--timeout=300",
                   "--", "train", "--config", write_cli_config(tmp_path, cfg.data.store),
                   "--workdir", str(one), timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with pytest.MonkeyPatch.context() as mp:
    server, _ = start_gcs_emulator(mp, "jaxlm-hosts-test")  # Children inherit its address.
    try:
      for rel in files_of(tmp_path / "store"):
        workdir_lib.write_bytes(f"gs://jaxlm-hosts-test/s/{rel}",
                                (tmp_path / "store" / rel).read_bytes())
      two = tmp_path / "two"
      config = write_cli_config(tmp_path, "gs://jaxlm-hosts-test/s", str(tmp_path / "cache"))
      proc = run_jaxlm("launch", "--num_processes=2", "--devices_per_process=2",
                       "--timeout=300", "--", "train", "--config", config, "--workdir",
                       str(two), timeout=400)
      assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
      server.stop()
  a, b = losses(one), losses(two)
  assert sorted(a) == sorted(b) and any(k[1] == "val/web/bpb" for k in a)
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)


def test_an_unreadable_file_names_itself_and_leaves_the_store_unfinished(tmp_path):
  cfg = two_source_config(tmp_path)
  (tmp_path / "web.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
  cfg.data.sources.web.path = str(tmp_path / "web.jsonl.gz")
  with pytest.raises(JaxlmError) as e:
    load(cfg)
  one_line(e, "cannot read", "web.jsonl.gz")
  assert not (tmp_path / "store" / "train" / "manifest.json").exists()
