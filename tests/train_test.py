"""The training loop: what it writes, its dispatch of K steps per call, bad setups."""

import json
import math
import os

import pytest
from conftest import load_config

from jaxlm import train
from jaxlm.errors import JaxlmError


@pytest.mark.slow
def test_train_and_evaluate_writes_the_workdir(tmp_path):
  cfg = load_config("smoke")
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(cfg, workdir)
  assert result["step"] == 30
  assert result["val/loss"] < math.log(65) - 0.5
  assert set(os.listdir(workdir)) >= {"config.json", "tokenizer.json", "metrics.jsonl", "events"}
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["vocab_size"] == 65 and saved["model"]["n_layer"] == 2
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [5, 10, 15, 20, 25, 30]
  eval_steps = [r["step"] for r in records if "val/loss" in r]
  assert eval_steps == [0, 15, 30]
  r = next(r for r in records if "train/loss" in r)
  assert {"lr", "tokens_per_sec", "mfu", "ms_per_step", "grad_norm"} <= set(r)
  assert 0 < r["mfu"] < 1
  last = [r for r in records if "val/loss" in r][-1]
  assert math.isclose(last["val/perplexity"], math.exp(last["val/loss"]), rel_tol=1e-9)
  assert os.listdir(os.path.join(workdir, "events"))


def test_batch_not_divisible_by_devices(tmp_path):
  cfg = load_config("smoke")
  cfg.train.batch_size = 6  # 8 fake devices in the tests.
  with pytest.raises(JaxlmError, match="batch_size=6 is not divisible by the 8-way batch split"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "afile"
  path.write_text("keep me")
  with pytest.raises(JaxlmError, match="is not a directory"):
    train.train_and_evaluate(load_config("smoke"), str(path))
  assert path.read_text() == "keep me"


@pytest.mark.slow
def test_loop_with_steps_per_call_matches_one_step_per_call(tmp_path):
  results = {}
  for k in (1, 4):
    cfg = load_config("smoke")
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every = 30, 10, 15
    cfg.checkpoint.every = 0
    cfg.train.steps_per_call = k
    workdir = str(tmp_path / f"k{k}")
    train.train_and_evaluate(cfg, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    results[k] = {(r["step"], key): r[key] for r in records
                  for key in ("train/loss", "val/loss", "grad_norm") if key in r}
  assert sorted(results[1]) == sorted(results[4])  # Same log and eval steps.
  for key, value in results[1].items():
    assert math.isclose(results[4][key], value, rel_tol=1e-5), key
