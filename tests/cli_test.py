"""The `jaxlm` console script end to end, and bad input as one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, assert_one_line_error, run_jaxlm

SMOKE = os.path.join(CONFIGS, "smoke.py")


jaxlm = run_jaxlm


@pytest.mark.slow
def test_train_smoke_config_through_the_console_script(tmp_path):
  workdir = tmp_path / "run"
  proc = jaxlm("train", "--config", SMOKE, "--workdir", str(workdir),
               "--config.model.n_layer=1", "--config.optim.lr=2e-3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stderr
  assert "step 30/30" in log and "tok/s" in log and "MFU" in log and "ETA" in log
  assert "val loss" in log and "final val loss" in log and "wall" in log
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["n_layer"] == 1 and saved["optim"]["lr"] == 2e-3  # Overrides applied.
  assert json.loads((workdir / "tokenizer.json").read_text())["kind"] == "char"


def test_unknown_config_key(tmp_path):
  proc = jaxlm("train", "--config", SMOKE, "--workdir", str(tmp_path),
               "--config.model.n_layers=3")
  assert_one_line_error(proc, "n_layers")


def test_wrong_type_for_config_key(tmp_path):
  proc = jaxlm("train", "--config", SMOKE, "--workdir", str(tmp_path),
               "--config.model.n_layer=three")
  assert_one_line_error(proc, "n_layer")


@pytest.mark.parametrize("override, fragment", [
    ("--config.model.d_model=30", "not divisible by model.n_head"),
    ("--config.model.block_size=0", "block_size must be >= 1"),
    ("--config.data.path=/nonexistent/corpus.txt", "corpus not found"),
])
def test_bad_values_fail_before_compiling(tmp_path, override, fragment):
  proc = jaxlm("train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), override)
  assert_one_line_error(proc, fragment)
  assert "compiled" not in proc.stderr


def test_workdir_is_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("precious")
  proc = jaxlm("train", "--config", SMOKE, "--workdir", str(f))
  assert_one_line_error(proc, "is not a directory")
  assert f.read_text() == "precious"


def test_unknown_command_and_missing_flags(tmp_path):
  proc = jaxlm("trian")
  assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr
  proc = jaxlm("train", "--config", SMOKE)
  assert_one_line_error(proc, "--workdir is required")


def test_python_dash_m_entry_point_works():
  proc = subprocess.run([sys.executable, "-m", "jaxlm.cli"], capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2 and "usage: jaxlm" in proc.stderr


def test_missing_or_broken_config_file(tmp_path):
  proc = jaxlm("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(proc, "config file not found", "nope.py")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  proc = jaxlm("train", "--config", str(broken), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(proc, "cannot load the config file", "SyntaxError")
