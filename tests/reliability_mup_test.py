"""μP (issue 20): model.parametrization = mup, its rules, the coordinate check, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import CONFIGS, REPO, assert_one_line_error, load_config, run_jaxlm

from jaxlm import build, mup, optim

SMOKE = os.path.join(CONFIGS, "smoke.py")
VOCAB = 65


def recipe_and_params(parametrization: str, width: int = 32, base: int = 32,
                      optimizer: str = "adamw", **model):
  c = load_config("smoke")
  c.model.parametrization = parametrization
  c.model.mup_base_width = base
  c.model.d_model = width
  c.optim.name = optimizer
  for k, v in model.items():
    c.model[k] = v
  r = build.make_recipe(c, VOCAB)
  tokens = jnp.zeros((1, c.model.block_size), jnp.int32)
  return r, nn.unbox(r.model.init({"params": jax.random.key(0)}, tokens)["params"])


def train(r, params, steps: int = 3):
  tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, VOCAB)
  opt_state = r.tx.init(params)

  def loss(p):
    logits = r.model.apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, s):
    updates, s = r.tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params, r.model.apply({"params": params}, tokens[:, :-1])


def bitwise_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), a, b)))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_mup_at_the_base_width_is_sp(optimizer):
  """Same init (bitwise, same seed), same updates and logits after 3 steps, both rules."""
  r_sp, p_sp = recipe_and_params("sp", optimizer=optimizer)
  r_mup, p_mup = recipe_and_params("mup", optimizer=optimizer)
  assert [g.name for g in r_mup.groups] == ["input", "hidden"]  # μP's groups are in play.
  assert bitwise_equal(p_sp, p_mup)
  (t_sp, logits_sp), (t_mup, logits_mup) = train(r_sp, p_sp), train(r_mup, p_mup)
  assert not bitwise_equal(t_sp, p_sp)  # The steps moved the params.
  assert bitwise_equal(t_sp, t_mup)
  assert bool((logits_sp == logits_mup).all())


def test_mup_multipliers_at_four_times_the_base_width():
  """Adam: hidden lr / 4, the rest 1; sgd: hidden 1, input and output x 4; init, logits and
  attention as the rule table says."""
  r, params = recipe_and_params("mup", width=128, base=32, tie_embeddings=False)
  assert {g.name: g.lr_mult for g in r.groups} == {"input": 1.0, "hidden": 0.25, "output": 1.0}
  assert r.mcfg.logit_mult == 0.25
  # 1/d attention: scores x sqrt(base head dim 8) / head dim 32.
  assert r.mcfg.attention_divisor == pytest.approx(32 / 8 ** 0.5)
  _, sp = recipe_and_params("sp", width=128, tie_embeddings=False)
  ratio = params["h_0"]["mlp"]["fc"]["kernel"].std() / sp["h_0"]["mlp"]["fc"]["kernel"].std()
  assert float(ratio) == pytest.approx(0.5, rel=0.05)  # std / sqrt(width_mult)
  assert float(params["lm_head"]["kernel"].std()) == pytest.approx(0.02, rel=0.05)
  r_sgd, _ = recipe_and_params("mup", width=128, base=32, optimizer="sgd",
                               tie_embeddings=False)
  assert {g.name: g.lr_mult for g in r_sgd.groups} == {"input": 4.0, "hidden": 1.0,
                                                       "output": 4.0}


def test_mup_splits_user_groups_by_role():
  c = load_config("smoke")
  c.model.parametrization, c.model.mup_base_width, c.model.d_model = "mup", 16, 64
  from jaxlm import defaults
  c.optim.groups.blocks = defaults.group(match="^h_", lr_mult=2.0)
  c.optim.groups.rest = defaults.group(match="^(wte|wpe|ln_f)")
  r = build.make_recipe(c, VOCAB)
  assert {g.name: g.lr_mult for g in r.groups} == {
      "blocks_input": 2.0, "blocks_hidden": 0.5, "rest_input": 1.0}


def test_params_shows_each_tensors_mup_role_and_multipliers():
  proc = run_jaxlm("params", "--config", SMOKE, "--config.model.parametrization=mup",
                   "--config.model.mup_base_width=16", "--format=json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  rows = {t["path"]: t["mup"] for t in report["tensors"]}
  assert rows["h_0/mlp/fc/kernel"] == {"role": "hidden", "init_mult": pytest.approx(2 ** -0.5),
                                       "lr_mult": 0.5}
  assert rows["ln_f/scale"]["role"] == "input" and rows["ln_f/scale"]["lr_mult"] == 1.0
  assert rows["wte/embedding"]["role"].startswith("input")  # Tied: input, and the logit mult.
  assert "width_mult 2" in report["mup"]


@pytest.mark.parametrize("overrides, fragments", [
    (["--config.model.mup_base_width=64"], ("mup_base_width <= model.d_model=32", "got 64")),
    (["--config.model.mup_base_width=0"], ("needs 1 <= model.mup_base_width",)),
    (["--config.model.mup_base_width=6"], ("mup_base_width=6 is not divisible by model.n_head=4",
                                            "mup_base_head_dim")),
    (["--config.model.mup_base_width=16", "--config.optim.name=muon"],
     ("μP has no rule for optimizer muon; use adamw",)),
], ids=["base-wider-than-model", "no-base", "base-not-divisible-by-heads", "muon"])
def test_bad_mup_input_is_one_line_before_compile(tmp_path, overrides, fragments):
  workdir = tmp_path / "run"
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", str(workdir),
                   "--config.model.parametrization=mup", *overrides)
  assert_one_line_error(proc, *fragments)
  assert "compiled" not in proc.stderr
  assert not (workdir / "config.json").exists()


def test_unknown_parametrization_is_one_line(tmp_path):
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", str(tmp_path / "run"),
                   "--config.model.parametrization=ntk")
  assert_one_line_error(proc, "model.parametrization='ntk' is not one of sp, mup")


def test_mup_refuses_a_muon_group():
  from jaxlm import config as config_lib
  from jaxlm import defaults
  from jaxlm.errors import JaxlmError
  c = load_config("smoke")
  c.model.parametrization, c.model.mup_base_width = "mup", 16
  c.optim.groups.hidden = defaults.group(roles="matrices", optimizer="muon")
  c.optim.groups.rest = defaults.group(roles="embeddings,head,norms,biases")
  with pytest.raises(JaxlmError, match="μP has no rule for optimizer muon"):
    config_lib.validate_config(c)
  c.model.parametrization = "sp"
  config_lib.validate_config(c)  # The same groups are fine under sp.


def test_rule_table_covers_every_optimizer_but_muon():
  assert set(mup.LR_EXPONENT) == set(optim.OPTIMIZERS) - {"muon"}


# The coordinate check's bound: under μP no layer's RMS grows or shrinks faster than
# width^0.5 over the steps; under sp the hidden layers' outputs grow faster than that.
SLOPE_BOUND = 0.5


@pytest.mark.slow
def test_coord_check_mup_slopes_stay_flat_while_sp_grows(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "mup_coord_check", "run.py"),
       "--widths", "32,64,128", "--steps", "3", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=900, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 0, proc.stderr[-3000:]
  slopes = json.load(open(tmp_path / "coord_check.json"))["slopes"]
  assert max(abs(s) for s in slopes["mup"].values()) < SLOPE_BOUND, slopes["mup"]
  hidden = {k: s for k, s in slopes["sp"].items() if "/" in k}
  assert min(hidden.values()) > SLOPE_BOUND, slopes["sp"]
  assert (tmp_path / "coord_check.png").stat().st_size > 0
  assert "| h_0/mlp |" in open(tmp_path / "slopes.md").read()


def test_transfer_plot_reports_the_optimum_per_width(tmp_path):
  """plot.py on a synthetic results.csv: the sp optimum moves two grid steps, mup's none; a
  diverged (NaN) trial is no optimum."""
  rows = ["trial,model.parametrization,model.d_model,optim.lr,final_val_loss,status"]
  for p, best in (("sp", {32: 0.01, 256: 0.001}), ("mup", {32: 0.01, 256: 0.01})):
    for w, b in best.items():
      for lr in (0.001, 0.003, 0.01):
        loss = 2.0 + abs(lr - b)
        rows.append(f"x,{p},{w},{lr},{loss},done")
  rows.append("x,sp,256,0.03,nan,diverged")
  (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "mup_transfer", "plot.py"),
       str(tmp_path / "results.csv"), str(tmp_path)], capture_output=True, text=True,
      timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "sp: the best lr goes from 0.01 at d_model 32 to 0.001 at d_model 256: -2" in proc.stdout
  assert "mup: the best lr goes from 0.01 at d_model 32 to 0.01 at d_model 256: +0" in proc.stdout
  assert (tmp_path / "loss_vs_lr.png").stat().st_size > 0


def test_hf_export_refuses_mup_away_from_its_base_width():
  from jaxlm import hf_map
  from jaxlm.errors import JaxlmError
  from jaxlm.model_config import ModelConfig
  tiny = dict(vocab_size=65, block_size=16, n_layer=1, n_head=4, parametrization="mup",
              mup_base_width=32)
  assert hf_map.family_of(ModelConfig(d_model=32, **tiny)) == "gpt2"  # At the base: plain GPT-2.
  with pytest.raises(JaxlmError, match="parametrization=mup away from its base width"):
    hf_map.family_of(ModelConfig(d_model=64, **tiny))
