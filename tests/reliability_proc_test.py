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
