"""Workdirs written before the restructure still load, evaluate, report and resume."""

import json
import math
import os
import shutil

import pytest
from conftest import REPO, load_config

from jaxlm import params as params_lib
from jaxlm import runs, train

OLD = os.path.join(REPO, "tests", "data", "workdir_v0")  # See its README.md.
EXPECTED = json.load(open(os.path.join(OLD, "expected.json")))


@pytest.fixture
def old_workdir(tmp_path):
  """A copy, so no test can change the checked-in workdir."""
  path = str(tmp_path / "old")
  shutil.copytree(OLD, path)
  return path


def test_old_workdir_evaluates_to_the_same_loss(old_workdir):
  result = runs.evaluate_run(old_workdir)
  assert result["step"] == 10 and result["tokens"] == EXPECTED["eval_tokens"]
  # Same checkpoint, same batches, same jitted evaluation: equal up to float noise.
  assert math.isclose(result["val/loss"], EXPECTED["eval_step_10_val_loss"], rel_tol=1e-6)


def test_old_workdir_loads_for_sampling_and_the_params_report(old_workdir):
  run = runs.load_run(old_workdir, step="latest")
  assert run.step == 10 and run.tokenizer.vocab_size == run.mcfg.vocab_size == 65
  report = params_lib.run_report(old_workdir)
  assert report["step"] == 10 and report["total"] > 0


@pytest.mark.slow
def test_old_workdir_resumes_where_it_left_off(old_workdir):
  cfg = load_config("smoke")
  cfg.train.steps, cfg.checkpoint.every, cfg.train.eval_every = 20, 10, 10
  result = train.train_and_evaluate(cfg, old_workdir)
  assert result["step"] == 20
  # The old loop ran one step per call, today's runs a one-step scan: the same math, fused
  # perhaps differently, hence a float32 tolerance.
  assert math.isclose(result["val/loss"], EXPECTED["resumed_to_20_val_loss"], rel_tol=1e-5)
