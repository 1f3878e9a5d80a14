"""Workdirs: the same tests on a local path and on gs:// (a local GCS emulator), and a full run.

The `gcs` fixture starts gcp-storage-emulator (a GCS JSON API server in Python) on a free port
in this process; gcsfs (behind etils.epath) follows STORAGE_EMULATOR_HOST and tensorstore
(behind orbax's array writes) follows TENSORSTORE_GCS_HTTP_URL, so every byte a gs:// run
writes goes to the emulator. Nothing here needs the network.
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, assert_one_line_error, load_config, run_jaxlm, start_gcs_emulator

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import metrics, runs, sample, sweep, tokenizers, train
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

BUCKET = "jaxlm-test"


def _with_generations(mp: pytest.MonkeyPatch) -> None:
  """Teaches the emulator GCS's object generations, which tensorstore's OCDBT relies on.

  gcp-storage-emulator ignores ifGenerationMatch / ifGenerationNotMatch and sends no
  x-goog-generation header with object data; tensorstore's read-modify-write of an OCDBT
  manifest then fails now and then ("Malformed StorageGeneration"). Real GCS does all three.
  """
  from http import HTTPStatus

  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  def generation(storage, bucket, name):
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except Exception:  # noqa: BLE001  (the emulator's NotFound)
      return "0"

  def query(request, key):
    values = request.query.get(key)
    return values[0] if values else None

  original_download, original_insert = objects.download, objects.insert

  def download(request, response, storage, *args, **kwargs):
    current = generation(storage, request.params["bucket_name"], request.params["object_id"])
    if query(request, "ifGenerationMatch") not in (None, current):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return
    if query(request, "ifGenerationNotMatch") == current:
      response.status = HTTPStatus.NOT_MODIFIED
      return
    original_download(request, response, storage, *args, **kwargs)
    if current != "0":
      response["x-goog-generation"] = current

  def insert(request, response, storage, *args, **kwargs):
    name, expected = query(request, "name"), query(request, "ifGenerationMatch")
    if name and expected is not None and expected != generation(
        storage, request.params["bucket_name"], name):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return
    original_insert(request, response, storage, *args, **kwargs)

  mp.setattr(objects, "download", download)  # objects.get calls it for alt=media.
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is original_download:
        mp.setitem(methods, method, download)
      elif handler is original_insert:
        mp.setitem(methods, method, insert)


@pytest.fixture(scope="module")
def gcs():
  """gs://jaxlm-test on a GCS emulator for this module; yields the bucket URL."""
  with pytest.MonkeyPatch.context() as mp:
    _with_generations(mp)
    server, url = start_gcs_emulator(mp, BUCKET)
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore (orbax's array writes).
    mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no credential lookup.
    yield f"gs://{BUCKET}"
    server.stop()


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  """A fresh directory, as a string: a local path, or a new gs:// prefix on the emulator."""
  if request.param == "local":
    return str(tmp_path / "wd")
  return f"{request.getfixturevalue('gcs')}/{request.node.name.replace('[', '-').rstrip(']')}"


# ---------------------------------------------------------------------------------------------
# The abstraction, on both filesystems.
# ---------------------------------------------------------------------------------------------

def test_prepare_then_whole_files_round_trip(root):
  p = workdir_lib.prepare(root)
  assert p.is_dir() or workdir_lib.is_remote(root)  # GCS has no empty directories.
  workdir_lib.write_text(p / "config.json", '{"a": 1}')
  workdir_lib.write_text(p / "config.json", '{"a": 2}')  # Replaces, whole.
  assert json.loads(workdir_lib.read_text(os.path.join(root, "config.json"))) == {"a": 2}
  workdir_lib.write_bytes(p / "plot.png", b"\x89PNG")
  assert (p / "plot.png").read_bytes() == b"\x89PNG"
  assert p.is_dir() and sorted(x.name for x in p.iterdir()) == ["config.json", "plot.png"]


def test_appender_appends_across_reopenings(root):
  p = workdir_lib.prepare(root) / "metrics.jsonl"
  with workdir_lib.Appender(p) as f:
    f.write("1\n")
    f.flush()
    assert workdir_lib.read_text(p) == "1\n"  # Visible after flush, on both filesystems.
    f.write("2\n")
  with workdir_lib.Appender(p) as f:  # A resumed run appends to what the last one wrote.
    f.write("3\n")
  workdir_lib.append_text(p, "4\n")
  assert workdir_lib.read_text(p) == "1\n2\n3\n4\n"


def test_local_mirror_uploads_what_grew(root):
  mirror = workdir_lib.LocalMirror(os.path.join(root, "events"))
  with open(os.path.join(mirror.local, "a"), "w") as f:
    f.write("x")
  mirror.sync()
  with open(os.path.join(mirror.local, "a"), "a") as f:
    f.write("y")
  mirror.close()
  assert (workdir_lib.path(root) / "events" / "a").read_text() == "xy"
  assert not workdir_lib.is_remote(root) or not os.path.exists(mirror.local)


def test_metrics_writer_records_read_back_by_the_sweep_reader(root):
  workdir_lib.prepare(root)
  with metrics.MetricsWriter(root, flush_sec=0.0) as w:
    w.write(5, {"train/loss": 2.5, "lr": np.float32(1e-3)})
    assert [r["step"] for r in sweep.read_metrics(root)] == [5]  # Flushed as written.
    w.write(10, {"val/loss": float("nan")})
  with metrics.MetricsWriter(root, tensorboard=False) as w:
    w.write(10, {"wall_time_sec": 1.0})
  records = sweep.read_metrics(root)
  assert [r["step"] for r in records] == [5, 10, 10]
  assert records[1]["val/loss"] == "nan" and math.isclose(records[0]["lr"], 1e-3, rel_tol=1e-6)
  events = list((workdir_lib.path(root) / "events").iterdir())
  assert events and all(e.name.startswith("events.out.tfevents") for e in events)


def test_samples_tokenizer_and_checkpoints(root):
  p = workdir_lib.prepare(root)
  sample.append_samples(p / "samples.txt", 0, "A", ["b", "c"])
  sample.append_samples(os.path.join(root, "samples.txt"), 5, "A", ["d"])
  assert workdir_lib.read_text(p / "samples.txt") == "== step 0 ==\nAb\nAc\n== step 5 ==\nAd\n"
  tok = tokenizers.make_tokenizer("char", b"hello world")
  tokenizers.save(tok, p / "tokenizer.json")
  loaded = tokenizers.load(os.path.join(root, "tokenizer.json"))
  np.testing.assert_array_equal(loaded.encode("hello"), tok.encode("hello"))

  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  ckpt = checkpoint_lib.Checkpointer(os.path.join(root, "checkpoints"), keep=1)
  ckpt.save(1, {"params": params}, {"note": "x"}, val_loss=2.0)
  ckpt.save(2, {"params": params}, {"note": "y"})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2] and ckpt.best_step() == 1
  target = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
  out = ckpt.restore(2, {"params": target})
  ckpt.close()
  np.testing.assert_array_equal(out["params"]["w"], params["w"])
  assert out["meta"]["note"] == "y"


def test_sweep_results_from_trial_directories(root):
  p = workdir_lib.prepare(root)
  for name, lr, loss in [("optim.lr=0.001", 1e-3, 2.0), ("optim.lr=0.01", 1e-2, 1.5)]:
    workdir_lib.write_text(p / name / "trial.json", json.dumps(
        {"name": name, "status": "done", "overrides": {"optim.lr": lr}, "attempts": 1}))
    workdir_lib.write_text(p / name / "metrics.jsonl", "".join(
        json.dumps(r) + "\n" for r in [{"step": 5, "train/loss": 3.0},
                                       {"step": 10, "val/loss": loss},
                                       {"step": 10, "wall_time_sec": 1.0}]))
  rows = sweep.summarize(root)
  assert [r["trial"] for r in rows] == ["optim.lr=0.01", "optim.lr=0.001"]
  results = workdir_lib.read_text(p / "results.md")
  assert "1.5000" in results and "loss_curves.png" in results
  assert (p / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert "optim.lr=0.01" in workdir_lib.read_text(p / "results.csv")


# ---------------------------------------------------------------------------------------------
# gs:// specifics: one-line errors.
# ---------------------------------------------------------------------------------------------

def test_gs_without_gcsfs_is_a_one_line_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
  with pytest.raises(JaxlmError, match=r"needs gcsfs: pip install 'jaxlm\[gcs\]'"):
    workdir_lib.path("gs://bucket/run")
  assert workdir_lib.path("runs/x").name == "x"  # Local paths need neither.


@pytest.mark.parametrize("url, message", [
    ("s3://bucket/run", "paths are local or gs://bucket/dir"),
    ("gs:///run", "names no bucket"),
])
def test_unsupported_urls(url, message):
  with pytest.raises(JaxlmError, match=message):
    workdir_lib.path(url)


def test_cli_gives_one_line_errors_for_bad_urls():
  assert_one_line_error(run_jaxlm("eval", "--workdir", "s3://bucket/run"),
                        "paths are local or gs://bucket/dir")


def test_missing_bucket_fails_in_prepare(gcs):
  with pytest.raises(JaxlmError, match="cannot write to workdir gs://no-such-bucket/run"):
    workdir_lib.prepare("gs://no-such-bucket/run")


def test_sweep_refuses_to_run_in_gs(gcs):
  with pytest.raises(JaxlmError, match="a sweep runs in a local --workdir"):
    sweep.run(None, f"{gcs}/sweep")


# ---------------------------------------------------------------------------------------------
# A full run on gs://: train, stop, resume, then load it back.
# ---------------------------------------------------------------------------------------------

def smoke(**overrides):
  cfg = load_config("smoke")
  cfg.train.steps = 20
  cfg.checkpoint.every = 5
  cfg.train.eval_every = 10
  cfg.sample.every = 10
  cfg.model.dropout = 0.1  # As in checkpoint_test: resume must rebuild the dropout key too.
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


@pytest.mark.slow
def test_train_stop_and_resume_on_gs_equals_an_uninterrupted_local_run(gcs, tmp_path):
  local, remote = str(tmp_path / "whole"), f"{gcs}/run"
  train.train_and_evaluate(smoke(), local)
  first = train.train_and_evaluate(smoke(**{"train.stop_at": 10}), remote)
  assert first["stopped_early"] and first["step"] == 10
  second = train.train_and_evaluate(smoke(), remote)
  assert second["step"] == 20 and not second["stopped_early"]

  p = workdir_lib.path(remote)
  names = {x.name for x in p.iterdir()}
  assert {"config.json", "tokenizer.json", "metrics.jsonl", "samples.txt", "events",
          "checkpoints"} <= names
  assert not any(n.startswith(".jaxlm-write-probe") for n in names)
  steps = sorted(int(x.name) for x in (p / "checkpoints").iterdir() if x.name.isdigit())
  assert steps[-1] == 20

  def losses(records):
    return [(r["step"], r[k]) for r in records for k in ("train/loss", "val/loss") if k in r
            and r["step"] > 10]
  remote_records = sweep.read_metrics(remote)
  assert losses(remote_records) and losses(remote_records) == losses(sweep.read_metrics(local))
  assert sum("wall_time_sec" in r for r in remote_records) == 2  # One line per attempt.
  samples = workdir_lib.read_text(p / "samples.txt")
  assert samples.count("== step 20 ==") == 1 and "== step 10 ==" in samples
  assert len(list((p / "events").iterdir())) == 2  # One event file per attempt.

  run = runs.load_run(remote)
  assert run.step == 20
  jax.tree.map(np.testing.assert_array_equal, run.params, runs.load_run(local).params)
  assert runs.evaluate_run(remote, step="best")["val/loss"] < math.log(65)



@pytest.mark.slow
def test_two_processes_share_a_gs_workdir_and_only_process_0_writes_its_files(gcs):
  workdir = f"{gcs}/two"
  proc = run_jaxlm("launch", "--num_processes=2", "--devices_per_process=2", "--timeout=400",
                   "--init_timeout=120", "--", "train", "--config",
                   os.path.join(CONFIGS, "smoke.py"), "--workdir", workdir,
                   "--config.train.steps=10", "--config.checkpoint.every=5", timeout=450)
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = workdir_lib.path(workdir)
  # Each file once: a second writer would have duplicated lines or overwritten the object.
  records = sweep.read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [5, 10]
  assert [r["step"] for r in records if "val/loss" in r] == [0, 10]
  assert workdir_lib.read_text(p / "samples.txt").count("== step 10 ==") == 1
  assert len(list((p / "events").iterdir())) == 1
  # Both processes took part in the orbax saves; one process reads them back.
  proc = run_jaxlm("eval", "--workdir", workdir, "--step", "5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("step 5 of gs://") and "val/loss " in proc.stdout, proc.stdout
