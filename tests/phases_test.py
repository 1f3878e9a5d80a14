"""Issue 22: where a run's wall goes (jaxlm.phases), the cached peak, and sample.every."""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import jax
import pytest
from conftest import CONFIGS, jaxlm_script, load_config

from jaxlm import bench, metrics, phases, train
from jaxlm.errors import JaxlmError
from jaxlm.host import xla


def test_phases_partition_the_wall_and_nested_blocks_return_to_their_phase():
  clock = phases.Phases(first="other")
  t0 = time.perf_counter()
  with clock("data"):
    time.sleep(0.05)
    with clock("compile"):
      time.sleep(0.1)
    time.sleep(0.05)  # Back in data, not in compile or other.
  clock.enter("steps")
  time.sleep(0.02)
  totals = clock.totals()
  outside = time.perf_counter() - t0
  assert set(totals) == set(phases.NAMES) | {"wall"}
  assert totals["data"] == pytest.approx(0.1, abs=0.03)
  assert totals["compile"] == pytest.approx(0.1, abs=0.03)
  assert totals["steps"] == pytest.approx(0.02, abs=0.03)
  assert totals["wall"] == pytest.approx(sum(v for k, v in totals.items() if k != "wall"))
  assert totals["wall"] == pytest.approx(outside, abs=0.01)
  with pytest.raises(ValueError, match="unknown phase 'compiling'"):
    with clock("compiling"):
      pass
  line = clock.summary()
  assert re.search(r"data 0\.1s \d+% \| compile 0\.1s", line) and line.endswith("s")
  assert "peak" not in line  # Phases under 0.05 s are left out of the line, not the record.
  assert set(clock.record()) == {f"phase/{k}_sec" for k in (*phases.NAMES, "wall")}


def test_process_start_is_the_first_import_of_jaxlm(monkeypatch):
  import jaxlm
  monkeypatch.delenv(phases.STARTED_ENV, raising=False)
  assert phases.process_start() == jaxlm.IMPORTED_AT < time.perf_counter()
  # An inherited start of another process (a parent's) is not this process' start.
  monkeypatch.setenv(phases.STARTED_ENV, f"{os.getppid()}:{jaxlm.IMPORTED_AT - 100.0!r}")
  assert phases.process_start() == jaxlm.IMPORTED_AT
  monkeypatch.setenv(phases.STARTED_ENV, f"{os.getpid()}:not-a-time")
  assert phases.process_start() == jaxlm.IMPORTED_AT


AGE = "import time; from jaxlm import phases; print(time.perf_counter() - phases.process_start())"


def test_a_shell_that_execs_jaxlm_after_other_work_does_not_charge_it_to_startup():
  # `cmd && jaxlm train` as a shell's last command runs jaxlm in the shell's own process (bash
  # execs it), so the process' start in /proc is the shell's: 1.5 s before jaxlm started.
  env = {k: v for k, v in os.environ.items() if k != phases.STARTED_ENV}
  command = f"sleep 1.5 && exec {shlex.quote(sys.executable)} -c {shlex.quote(AGE)}"
  out = subprocess.run(["bash", "-c", command],
                       capture_output=True, text=True, timeout=60, env=env, check=True)
  assert 0.0 < float(out.stdout) < 1.0


def test_the_start_carries_across_a_restart_of_the_same_process_only():
  # What host.allocator does: re-execute the process with the start in the environment.
  script = (f"import os, sys, time, subprocess; os.environ[{phases.STARTED_ENV!r}] = "
            "f'{os.getpid()}:{time.perf_counter() - 5.0!r}'; "
            f"print(subprocess.run([sys.executable, '-c', {AGE!r}], capture_output=True, "
            "text=True).stdout.strip(), flush=True); "
            f"os.execv(sys.executable, [sys.executable, '-c', {AGE!r}])")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, check=True)
  child, restarted = map(float, out.stdout.split())
  assert child < 1.0  # A child process inherits the variable and ignores it.
  assert 5.0 <= restarted < 7.0


@pytest.mark.slow
def test_jaxlm_train_prints_and_records_phases_that_sum_to_the_process_wall(tmp_path):
  workdir = tmp_path / "run"
  t0 = time.perf_counter()
  proc = subprocess.run([jaxlm_script(), "train", "--config", os.path.join(CONFIGS, "smoke.py"),
                         "--workdir", str(workdir), "--config.train.steps=20"],
                        capture_output=True, text=True, timeout=300)
  outside = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
  record = {k[len("phase/"):-len("_sec")]: v for k, v in last.items() if k.startswith("phase/")}
  assert set(record) == set(phases.NAMES) | {"wall"}
  assert record["wall"] == pytest.approx(sum(v for k, v in record.items() if k != "wall"))
  # Every phase a run goes through took time; the imports are in startup.
  for name in ("startup", "data", "init", "compile", "steps", "eval", "save"):
    assert record[name] > 0, name
  assert record["startup"] > 0.3
  # The wall from the first import of jaxlm is the run the user waited for: only the
  # interpreter's start and the exit are missing.
  assert record["wall"] <= outside and outside - record["wall"] < 3.0
  assert last["wall_time_sec"] <= record["wall"]
  line = next(x for x in proc.stderr.splitlines() if "phases: " in x)
  assert "startup" in line and "compile" in line and "steps" in line and "wall" in line


@pytest.mark.slow
def test_bench_reports_the_same_phases():
  cfg = load_config("smoke")
  clock = phases.Phases(first="other")
  report = bench.bench_train(cfg, steps=5, phases=clock, sampling=True)
  got = report["phases"]
  assert set(got) == set(phases.NAMES) | {"wall"}
  for name in ("init", "compile", "steps", "sample"):
    assert got[name] > 0, name
  assert got["compile"] >= report["compile_s"] * 0.99
  assert got["wall"] == pytest.approx(sum(v for k, v in got.items() if k != "wall"))
  assert "phases            " in bench.format_report(report)


def test_the_measured_peak_is_cached_per_machine_and_remeasured_on_request(monkeypatch,
                                                                           tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # No peak another test measured.
  calls = []

  def fake_measure(device, dtype="float32", n=1024, reps=20):
    calls.append(dtype)
    return 1e11 * len(calls)

  monkeypatch.setattr(metrics, "measure_matmul_flops", fake_measure)
  monkeypatch.setattr(metrics, "_measured_peak", {})
  monkeypatch.setattr(xla, "original_env", lambda: None)  # No child process here.
  cpu = jax.devices("cpu")[0]
  assert metrics.peak_flops_per_device(cpu, "float32") == 1e11
  monkeypatch.setattr(metrics, "_measured_peak", {})  # A new process: the file answers.
  assert metrics.peak_flops_per_device(cpu, "float32") == 1e11 and len(calls) == 1
  # jaxlm bench measures again and keeps the faster reading.
  assert metrics.peak_flops_per_device(cpu, "float32", remeasure=True) == 2e11
  assert len(calls) == 2
  monkeypatch.setattr(metrics, "_measured_peak", {})
  assert metrics.peak_flops_per_device(cpu, "float32") == 2e11
  # Other XLA flags are another machine as far as the peak goes: measured anew.
  monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"] + " --xla_cpu_use_thunk_runtime=true")
  monkeypatch.setattr(metrics, "_measured_peak", {})
  assert metrics.peak_flops_per_device(cpu, "float32") == 3e11 and len(calls) == 3
  # A damaged cache file is measured over and rewritten, never an error.
  with open(metrics.peak_cache_path(), "w") as f:
    f.write("{not json")
  monkeypatch.setattr(metrics, "_measured_peak", {})
  assert metrics.peak_flops_per_device(cpu, "float32") == 4e11
  assert json.load(open(metrics.peak_cache_path()))


def sample_steps(workdir):
  return [int(m) for m in re.findall(r"^== step (\d+) ==$",
                                     open(os.path.join(workdir, "samples.txt")).read(), re.M)]


@pytest.mark.slow
def test_samples_are_written_every_sample_every_steps_or_only_at_the_end(tmp_path):
  cfg = load_config("smoke")
  cfg.train.steps, cfg.train.eval_every, cfg.sample.max_new_tokens = 12, 4, 8
  train.train_and_evaluate(cfg, str(tmp_path / "last"))
  assert sample_steps(tmp_path / "last") == [12]  # The default: evaluations do not sample.
  cfg.sample.every = 5  # Not a multiple of the eval or log period: a boundary of its own.
  result = train.train_and_evaluate(cfg, str(tmp_path / "every"))
  assert sample_steps(tmp_path / "every") == [0, 5, 10, 12] and result["step"] == 12


def test_a_negative_sample_every_is_one_line_before_anything_runs(tmp_path):
  cfg = load_config("smoke")
  cfg.sample.every = -1
  with pytest.raises(JaxlmError, match=r"sample.every=-1 must be >= 0"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
