"""Issue 23, items 3, 13, 16, 17 and 18: one workdir, one run; Ctrl-C and huge requests in
`jaxlm sample`; launch, sweep and tokenizer input; signals before the loop; TPU script quoting.
"""

import os
import signal
import stat
import subprocess

import pytest
from conftest import CONFIGS, assert_one_line_error, jaxlm_script, run_jaxlm

from jaxlm import memory, sample
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError
from jaxlm.host import tpu_commands

SMOKE = os.path.join(CONFIGS, "smoke.py")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """A short finished smoke run to sample from."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=4",
                   "--config.train.eval_every=0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


# --- 13. `jaxlm sample`: Ctrl-C exits 130 in one line; a huge --max_new_tokens is refused -------
def test_max_new_tokens_beyond_memory_is_one_line(smoke_run):
  proc = run_jaxlm("sample", "--workdir", smoke_run, "--max_new_tokens", "2000000000")
  assert_one_line_error(proc, "max_new_tokens=2000000000", "memory available", "block_size=16")


def test_check_fits_bounds_by_memory_and_int32(monkeypatch):
  cfg = model_lib.ModelConfig(vocab_size=65, block_size=16, n_layer=1, n_head=1, d_model=8)
  monkeypatch.setattr(memory, "available_bytes", lambda: 2 * 1000 * sample.BYTES_PER_TOKEN)
  sample.check_fits(sample.SampleSettings(max_new_tokens=990), cfg, 1, 10)
  with pytest.raises(JaxlmError, match="at most 990 tokens per sample"):
    sample.check_fits(sample.SampleSettings(max_new_tokens=991), cfg, 1, 10)
  with pytest.raises(JaxlmError, match="at most 490 tokens"):
    sample.check_fits(sample.SampleSettings(max_new_tokens=991), cfg, 2, 10)
  monkeypatch.setattr(memory, "available_bytes", lambda: 0)  # Unknown: only int32 bounds it.
  with pytest.raises(JaxlmError, match="must stay under 2147483647 tokens"):
    sample.check_fits(sample.SampleSettings(max_new_tokens=2**31 - 5), cfg, 1, 10)


@pytest.mark.slow
def test_ctrl_c_while_sampling_exits_130_in_one_line(smoke_run):
  proc = subprocess.Popen([jaxlm_script(), "sample", "--workdir", smoke_run,
                           "--max_new_tokens", "1000000"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  shown = proc.stdout.read(100)  # Streaming has begun: decode chunks are running.
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err, err[-2000:]
  lines = [line for line in err.splitlines() if line.startswith("jaxlm:")]
  assert len(lines) == 1 and lines[0].startswith("jaxlm: interrupted after "), err[-2000:]
  assert len(shown + out) > 100  # What was generated stays printed.


# --- 18. `jaxlm tpu --tpu_jax` is one shell word on the workers, never code ----------------------
def _fake(path, script: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("#!/bin/sh\n" + script)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_tpu_jax_payload_is_quoted_in_the_install_script(tmp_path):
  marker = tmp_path / "pwned"
  payload = f"jax[tpu]$(touch {marker})`touch {marker}`\"; touch {marker}; \""
  s = tpu_commands.make_slice("lm1", "us-central2-b", "v4-8")
  setup = tpu_commands.Setup(repo_dir=str(tmp_path), repo_url="https://example.com/j.git",
                             jax=payload)
  script = tpu_commands.setup_commands(s, setup)[-1][-1]  # The --command of the install ssh.
  # Run it as a worker would, with pip and uv faked: uv records the arguments it was given.
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  _fake(str(bin_dir / "python3"), "exit 0\n")
  _fake(str(home / ".local" / "bin" / "uv"),
        f'for a in "$@"; do printf "%s\\n" "$a"; done >> {tmp_path / "uv_args"}\n')
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)}
  proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert not marker.exists(), "the --tpu_jax payload ran on the worker"
  assert payload in (tmp_path / "uv_args").read_text().splitlines()


# --- 3. One run per workdir --------------------------------------------------------------------
def _dead_pid() -> int:
  child = subprocess.Popen(["true"])
  child.wait()
  return child.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
  from jaxlm import lock
  workdir = str(tmp_path / "w")
  with lock.WorkdirLock(workdir) as held:
    assert held.held and os.path.exists(os.path.join(workdir, lock.NAME))
    other = lock.WorkdirLock(workdir)
    other.record = {**other.record, "pid": other.record["pid"] + 1}
    with pytest.raises(JaxlmError, match=f"pid {os.getpid()} on host .* \\(this one\\)"):
      other.acquire()
  assert not os.path.exists(os.path.join(workdir, lock.NAME))  # Released.
  stale = lock.WorkdirLock(workdir)
  stale.record = {**stale.record, "pid": _dead_pid()}
  assert stale._create()  # A process that died holding the lock.
  with lock.WorkdirLock(workdir) as taken:
    assert taken._read()["pid"] == os.getpid()
  elsewhere = lock.WorkdirLock(workdir)
  elsewhere.record = {**elsewhere.record, "host": "another-host", "pid": _dead_pid()}
  assert elsewhere._create()  # Another host's pid says nothing here: never stale.
  with pytest.raises(JaxlmError, match="host another-host.*delete"):
    lock.WorkdirLock(workdir).acquire()


@pytest.mark.slow
def test_a_second_train_on_the_same_workdir_is_refused_in_one_line(tmp_path):
  workdir = str(tmp_path / "w")
  args = ["train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=2000",
          "--config.train.eval_every=0", "--config.checkpoint.every=1000"]
  first = subprocess.Popen([jaxlm_script(), *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  try:
    while "compiled train step" not in first.stderr.readline():
      assert first.poll() is None, "the first run stopped"
    second = run_jaxlm(*args)
    assert_one_line_error(second, "in use by another jaxlm train", f"pid {first.pid}")
  finally:
    first.send_signal(signal.SIGTERM)  # Stops it with a checkpoint and releases the lock.
    _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  assert not os.path.exists(os.path.join(workdir, "jaxlm.lock"))
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  steps = [line for line in metrics if '"train/loss"' in line]
  assert len(steps) == len(set(steps))  # Each step logged once: nobody else wrote.


# --- 16. Signals before the loop; launch's flags -----------------------------------------------
@pytest.mark.slow
def test_sigterm_during_compile_stops_with_exit_0(tmp_path):
  workdir = str(tmp_path / "w")
  proc = subprocess.Popen([jaxlm_script(), "train", "--config", SMOKE, "--workdir", workdir],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  while "optimizer group" not in proc.stderr.readline():  # The last line before compiling.
    assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped at step" in err and "Traceback" not in err
  assert not os.path.exists(os.path.join(workdir, "jaxlm.lock"))


@pytest.mark.parametrize("flag,fragment", [("--process_ids=x", "comma-separated integers"),
                                           ("--coordinator=notaport", "host:port")])
def test_launch_flags_are_checked(flag, fragment):
  assert_one_line_error(run_jaxlm("launch", flag, "--", "train"), fragment)


# --- 17. Divergence names the first non-finite step, not the step it was noticed at -------------
def test_first_nonfinite_names_the_first_bad_step():
  import types

  import numpy as np

  from jaxlm import run_log
  log = types.SimpleNamespace(first=10, pending=[{"loss": np.array([2.0, 1.5])},
                                                 {"loss": np.array([np.inf, np.nan])}])
  step, loss = run_log.StepLog.first_nonfinite(log)
  assert step == 13 and loss == np.inf
  log.pending = [{"loss": np.array([1.0])}]
  assert run_log.StepLog.first_nonfinite(log) is None
