"""Issue 23, items 7, 10, 8 and 2: what a run logs across a resume, the token cache's checksum,
and a full disk (for real: a small tmpfs, or RLIMIT_FSIZE where mounting is not allowed)."""

import glob
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import CONFIGS, REPO, assert_one_line_error, jaxlm_script, run_jaxlm

from jaxlm import checkpoint as checkpoint_lib

SMOKE = os.path.join(CONFIGS, "smoke.py")


def train(workdir, *overrides):
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", str(workdir), *overrides)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def keyed(workdir, key="train/loss"):
  return [(r["step"], r[key]) for r in records(workdir) if key in r]


def sample_steps(workdir):
  return [int(line.split()[2]) for line in open(os.path.join(workdir, "samples.txt"))
          if line.startswith("== step ")]


def tensorboard_scalars(workdir):
  """tag -> steps, as TensorBoard shows them: files in order, a restart marker (SessionLog
  START at step s) hiding every earlier event at step >= s."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in glob.glob(os.path.join(workdir, "events", "*tfevents*")):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      events.append(event)
      i += 12 + n + 4
  events.sort(key=lambda e: e.wall_time)
  shown: dict[str, list[int]] = {}
  for e in events:
    if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
      shown = {t: [s for s in steps if s < e.step] for t, steps in shown.items()}
    for v in e.summary.value:
      shown.setdefault(v.tag, []).append(e.step)
  return shown


def assert_each_step_once(workdir):
  seen = [(r["step"], k) for r in records(workdir) for k in r if k != "step"]
  assert len(seen) == len(set(seen)), sorted(x for x in seen if seen.count(x) > 1)
  steps = sample_steps(workdir)
  assert len(steps) == len(set(steps)), steps
  for tag, tb_steps in tensorboard_scalars(workdir).items():
    assert len(tb_steps) == len(set(tb_steps)), (tag, tb_steps)


@pytest.mark.slow
def test_a_stopped_and_resumed_run_logs_what_an_uninterrupted_one_does(tmp_path):
  """Item 7: the record of the interval that spans the stop averages every step of it; a stop
  between log steps (12: log_every is 5) writes no partial record. Item 10: no step twice."""
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  train(whole)
  proc = train(resumed, "--config.train.stop_at=12")
  assert "stop  step 12" in proc.stderr
  train(resumed)
  train(resumed)  # A finished run run again writes nothing new.
  got, want = keyed(resumed), keyed(whole)
  assert [s for s, _ in got] == [s for s, _ in want]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
  assert sample_steps(resumed) == sample_steps(whole)
  assert_each_step_once(resumed)


@pytest.mark.slow
def test_records_written_after_the_last_checkpoint_are_replaced_not_doubled(tmp_path):
  """Item 10: an attempt that died after logging steps 25 and 30 but before checkpoint 30
  finished; the resumed run writes those steps again, once."""
  w = tmp_path / "w"
  train(w, "--config.sample.every=15")
  shutil.rmtree(w / "checkpoints" / "30")  # As if the process died while saving step 30.
  want = keyed(w)
  train(w, "--config.sample.every=15")
  got = keyed(w)
  assert [s for s, _ in got] == [s for s, _ in want]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
  assert sample_steps(w) == [0, 15, 30]
  assert_each_step_once(w)


def test_throughput_counts_only_the_steps_since_the_clock_restarted(monkeypatch):
  """Item 7: an evaluation or save between log steps restarts the clock at its step, so the
  next record's ms/step divides the time since then by the steps since then."""
  from jaxlm import metrics, run_log
  clock = [0.0]
  monkeypatch.setattr(run_log.time, "perf_counter", lambda: clock[0])
  monkeypatch.setattr(metrics, "peak_flops_total", lambda dtype="float32": 1e12)
  written = []
  writer = types.SimpleNamespace(write=lambda step, rec: written.append((step, rec)))
  cfg = types.SimpleNamespace(train=types.SimpleNamespace(batch_size=2, steps=60, log_every=50,
                                                          log_params_every=0),
                              optim=types.SimpleNamespace(name="adamw"))
  mcfg = types.SimpleNamespace(n_layer=1, d_model=4, block_size=8, layer_windows=(),
                               dtype="float32")
  setup = types.SimpleNamespace(mcfg=mcfg, recipe=types.SimpleNamespace(
      schedule=lambda s: 1e-3, groups=[], schedule_free=False))
  params = {"wte": {"embedding": np.zeros((8, 4), np.float32)}}
  log = run_log.StepLog(cfg, setup, params, writer, 0)
  for step in range(1, 51):
    clock[0] += 1.0  # One second a step...
    log.add({"loss": np.ones(1, np.float32), "grad_norm": np.ones(1), "param_norm": np.ones(1)})
    if step in (20, 30, 40):  # ...and a save or an evaluation of 100 s at these steps.
      clock[0] += 100.0
      log.restart_clock(step)
  log.flush(50)
  assert written[-1][1]["ms_per_step"] == pytest.approx(1000.0)


def test_the_token_cache_checks_its_tokens_checksum(tmp_path, caplog):
  """Item 8: a cache entry damaged in place (same size) is rebuilt, with one warning."""
  from jaxlm import data
  cache = str(tmp_path / "cache")
  first = data.load_dataset("", "char", val_fraction=0.1, block_size=16, cache_dir=cache)
  want = np.concatenate([first.train, first.val]).copy()
  (bin_path,) = glob.glob(os.path.join(cache, "*.bin"))
  with open(bin_path, "r+b") as f:  # Garbage over a block in the middle: the size is kept.
    f.seek(4096)
    f.write(b"\xff" * 4096)
  with caplog.at_level("WARNING"):
    again = data.load_dataset("", "char", val_fraction=0.1, block_size=16, cache_dir=cache)
  np.testing.assert_array_equal(np.concatenate([again.train, again.val]), want)
  assert [r for r in caplog.records if "fails its checksum" in r.getMessage()]
  third = data.load_dataset("", "char", val_fraction=0.1, block_size=16, cache_dir=cache)
  np.testing.assert_array_equal(np.concatenate([third.train, third.val]), want)


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("size, kept", [("100k", None), ("1200k", 20)])
def test_a_full_disk_ends_the_run_in_one_line(tmp_path, size, kept):
  """Item 2, for real: the workdir on a tmpfs too small for the run (the first checkpoint, or
  the third). Without root (no mount), RLIMIT_FSIZE makes every write past a size fail."""
  disk = tmp_path / "disk"
  mounted = _mount_tmpfs(disk, size)
  try:
    w = disk / "w"
    limit = None if mounted else {"100k": 60_000, "1200k": 200_000}[size]
    def preexec():
      if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes get EFBIG instead of a kill.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([jaxlm_script(), "train", "--config", SMOKE, "--workdir", str(w)],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          preexec_fn=preexec)
    line = assert_one_line_error(proc, "writing ", str(w), "the run stopped")
    assert proc.stderr.rstrip().splitlines()[-1] == line
    if mounted:  # (Under RLIMIT_FSIZE, which files fail first is the sizes' business.)
      # What the line says is kept is what the workdir holds, each step complete. Which step
      # fills the disk depends on every file a run writes, so only the small disk's is fixed.
      ckpt_dir = w / "checkpoints"
      steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) if os.path.isdir(
          ckpt_dir) else []
      if kept is None:
        assert "no checkpoint was kept" in line and steps == []
      else:
        assert (f"a rerun resumes from step {steps[-1]}" in line) if steps else (
            "no checkpoint was kept" in line)
        for step in steps:
          assert checkpoint_lib.inspect(checkpoint_lib.epath.Path(ckpt_dir) / str(step)) is None
  finally:
    if mounted:
      subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_full_disk_names_the_file_a_write_failed_on(tmp_path):
  """Item 2's neighbours: metrics.jsonl (an append) and a whole-file write name their path and
  leave no temporary file behind (RLIMIT_FSIZE, in a child so the limit stays there)."""
  code = f"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from jaxlm import workdir as w
a = w.Appender({str(tmp_path / 'metrics.jsonl')!r})
try:
  a.write("x" * 2000)
except OSError as e:
  print("append", e.errno in w.DISK_FULL, e.filename)
try:
  w.write_text({str(tmp_path / 'config.json')!r}, "y" * 2000)
except OSError as e:
  print("whole", e.errno in w.DISK_FULL, e.filename)
print(sorted(os.listdir({str(tmp_path)!r})))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}).stdout.splitlines()
  assert out[0] == f"append True {tmp_path / 'metrics.jsonl'}"
  assert out[1] == f"whole True {tmp_path / 'config.json'}"
  assert out[2] == "['metrics.jsonl']"
