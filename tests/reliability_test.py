"""Issue 23: nothing saved is ever lost, and numbers are never silently wrong.

Diverged runs stop before they save a non-finite state and never displace the best checkpoint;
a refused resume changes nothing in the workdir; out-of-range optimizer and checkpoint values
are one-line errors before anything compiles.
"""

import json
import math
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, assert_one_line_error, load_config, run_jaxlm

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import runs, train
from jaxlm.errors import JaxlmError


# --- 1. Divergence: a NaN is never saved and never becomes the best ------------------------------
def test_a_nan_val_loss_never_displaces_the_best_checkpoint(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=2)
  params = {"w": jnp.ones((2, 3))}
  for step, val_loss in [(1, 2.0), (2, math.nan), (3, math.inf), (4, None), (5, None)]:
    ckpt.save(step, {"params": params}, {}, val_loss=val_loss)
  ckpt.wait()
  assert ckpt.all_steps() == [1, 4, 5]  # The latest two, and 1: the best, NaN counting as worst.
  assert ckpt.best_step() == 1
  ckpt.close()


def test_save_refuses_a_non_finite_state(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"))
  training = types.SimpleNamespace(params_for_eval=lambda s: s.params, eval_params=None)
  state = types.SimpleNamespace(params={"w": jnp.array([1.0, jnp.nan])},
                                opt_state={"count": jnp.int32(3)})
  with pytest.raises(JaxlmError, match="diverged at step 7: the params or optimizer state "
                     "hold a NaN.*the last checkpoint, step 5, is kept"):
    train.save(ckpt, training, state, 7, {}, None, 5)
  ckpt.wait()
  assert ckpt.all_steps() == []
  ckpt.close()


def diverging_smoke(**train_overrides):
  """The smoke model with lr 100 and no clipping: NaN after about 10 steps, worse from step 3."""
  cfg = load_config("smoke")
  cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 100.0, 30, 0.0
  cfg.train.log_every, cfg.checkpoint.every, cfg.train.eval_every = 10, 3, 3
  for key, value in train_overrides.items():
    cfg.train[key] = value
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_a_diverged_run_stops_at_its_first_nan_and_keeps_only_finite_checkpoints(
    tmp_path, steps_per_call):
  # Logs every 10 steps but saves and evaluates every 3: the NaN must be caught before a save
  # (with 1 step per call the first NaN is a training loss; with 3, an evaluation's).
  workdir = str(tmp_path / "run")
  with pytest.raises(JaxlmError, match=r"training diverged at step \d+: (eval val/)?loss is "
                     r"nan; the last checkpoint, step \d+, is kept") as e:
    train.train_and_evaluate(diverging_smoke(steps_per_call=steps_per_call), workdir)
  first_nan, kept = map(int, re.search(r"step (\d+):.*step (\d+),", str(e.value)).groups())
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  steps = ckpt.all_steps()
  assert steps[-1] == kept < first_nan
  assert ckpt.best_step() == 3 and 3 in steps  # Val loss only rises after step 3.
  for step in steps:
    assert math.isfinite(ckpt.meta(step)["val_loss"])
    params = runs.load_run(workdir, step).params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  ckpt.close()


# --- 2. A refused resume changes nothing ---------------------------------------------------------
def snapshot(workdir):
  """{relative path: bytes} of every file under `workdir`."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, workdir)] = fh.read()
  return out


@pytest.mark.slow
def test_a_refused_or_failed_start_leaves_the_workdir_as_it_was(tmp_path):
  workdir = str(tmp_path / "run")
  # A first attempt that fails before it trains leaves no config.json to refuse the next one.
  cfg = load_config("smoke")
  cfg.model.n_layer, cfg.train.init_from = 3, str(tmp_path / "no_such_run")
  with pytest.raises(JaxlmError, match="no_such_run"):
    train.train_and_evaluate(cfg, workdir)
  assert "config.json" not in snapshot(workdir)
  cfg = load_config("smoke")
  cfg.train.steps, cfg.train.eval_every = 5, 0
  train.train_and_evaluate(cfg, workdir)  # Another n_layer than the failed attempt: not refused.

  # An optimizer whose state does not match the checkpoint's: refused, and nothing changed.
  before = snapshot(workdir)
  cfg.optim.name = "sgd"
  with pytest.raises(JaxlmError, match="optim.name='adamw' but the config says 'sgd'"):
    train.train_and_evaluate(cfg, workdir)
  assert snapshot(workdir) == before

  # A diverged checkpoint (as an older jaxlm saved them): refused, not resumed from.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  saved = ckpt._manager.restore(5)  # Every item as it was saved (host arrays, no targets).
  nan_params = jax.tree.map(lambda x: np.full_like(x, np.nan), saved["params"])
  ckpt.save(6, {"params": nan_params, "opt_state": saved["opt_state"]}, dict(saved["meta"]))
  ckpt.wait()
  ckpt.close()
  before = snapshot(workdir)
  cfg.optim.name = "adamw"
  with pytest.raises(JaxlmError, match="checkpoints/6 holds NaN or infinite values"):
    train.train_and_evaluate(cfg, workdir)
  assert snapshot(workdir) == before


# --- 3. Out-of-range numbers are one-line errors before anything compiles -----------------------
@pytest.mark.parametrize("key, value, message", [
    ("optim.b1", 1.5, "optim.b1=1.5 must be in [0, 1)"),
    ("optim.b2", 1.0, "optim.b2=1.0 must be in [0, 1)"),
    ("optim.b1", -0.1, "optim.b1=-0.1 must be in [0, 1)"),
    ("optim.muon_beta", 1.0, "optim.muon_beta=1.0 must be in [0, 1)"),
    ("optim.weight_decay", -5.0, "optim.weight_decay=-5.0 must be >= 0"),
    ("optim.eps", -1.0, "optim.eps=-1.0 must be > 0"),
    ("optim.eps", 0.0, "optim.eps=0.0 must be > 0"),
    ("optim.lr", math.nan, "optim.lr=nan must be >= 0"),
    ("optim.lr", math.inf, "optim.lr=inf must be >= 0"),
    ("optim.min_lr", 1.0, "optim.min_lr=1.0 is above optim.lr=0.003"),
    ("optim.grad_clip", -1.0, "optim.grad_clip=-1.0 must be >= 0"),
    ("train.z_loss", -1.0, "train.z_loss=-1.0 must be >= 0"),
    ("checkpoint.every", -5, "checkpoint.every=-5 must be >= 0"),
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be >= 1"),
])
def test_out_of_range_values_are_refused(key, value, message):
  cfg = load_config("smoke")
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(JaxlmError, match=re.escape(message)):
    config_lib.validate_config(cfg)


@pytest.mark.parametrize("overrides", [
    {"optim.b1": 0.0},  # sgd without momentum.
    {"optim.name": "sgd", "optim.b1": 0.0},
    {"optim.schedule": "constant", "optim.lr": 1e-5},  # Below the default min_lr: unused.
    {"optim.name": "schedule_free_adamw", "optim.lr": 1e-5},  # Always constant.
    {"optim.lr": 0.0, "optim.min_lr": 0.0, "optim.grad_clip": 0.0, "checkpoint.every": 0},
])
def test_edge_values_that_mean_something_are_accepted(overrides):
  cfg = load_config("smoke")
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  config_lib.validate_config(cfg)


def test_warmup_longer_than_the_run_is_a_warning(caplog):
  cfg = load_config("smoke")
  cfg.optim.warmup_steps = 100  # smoke trains 30 steps.
  with caplog.at_level("WARNING"):
    config_lib.validate_config(cfg)
  assert "optim.warmup_steps=100 is more than train.steps=30" in caplog.text


def test_a_nan_lr_is_one_line_error_from_the_cli():
  proc = run_jaxlm("train", "--config", os.path.join(CONFIGS, "smoke.py"), "--workdir",
                   "/nonexistent/never-created", "--config.optim.lr=nan")
  assert_one_line_error(proc, "optim.lr=nan must be >= 0")


# --- Next to 1: NaNs that older runs saved -------------------------------------------------------
def test_a_sweep_never_ranks_a_nan_trial_first(tmp_path):
  from jaxlm.sweep import report, state
  for name, vals in [("a", [4.0, math.nan]), ("b", [3.0, 2.5]), ("c", [math.nan])]:
    state.write_state(str(tmp_path / name), {"name": name, "status": "done", "overrides": {}})
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      f.writelines(json.dumps({"step": i, "val/loss": v}) + "\n" for i, v in enumerate(vals))
  rows = report.collect(str(tmp_path))
  assert [r["trial"] for r in rows] == ["b", "a", "c"]
  assert [r["best_val_loss"] for r in rows] == [2.5, 4.0, None]
