"""`jaxlm params`: anatomy, memory and compute preflight, in-step layer stats, drift from init."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, REPO, load_config

from jaxlm import build as build_lib
from jaxlm import config as config_lib
from jaxlm import metrics, optim, params, sharding, train
from jaxlm import model as model_lib
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError


def report_for(name, n_devices=8, **overrides):
  cfg = load_config(name)
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    cfg[section][key] = value
  return params.config_report(cfg, n_devices=n_devices)


def smoke_state(cfg):
  model = model_lib.make_model(config_lib.model_config(cfg, 65))
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  # Jitted: op-by-op init of even a tiny model takes seconds.
  init = jax.jit(lambda r: nn.unbox(step_lib.init_boxed_state(r, model=model, tx=tx)))
  return model, tx, init(jax.random.key(0))


def random_batch(batch_size, length, vocab=65, seed=0):
  tokens = np.random.default_rng(seed).integers(0, vocab, size=(batch_size, length + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


# --- Anatomy ------------------------------------------------------------------------------------

def test_gpt2_small_has_124_439_808_parameters():
  r = report_for("gpt2_small")
  p = r["params"]
  assert p["total"] == 124_439_808 == p["formula_total"]
  assert sum(p["by_kind"].values()) == p["total"] == sum(p["by_layer"].values())
  assert sum(t["count"] for t in r["tensors"]) == p["total"]
  assert p["by_kind"] == p["formula_by_kind"]
  # 12 blocks of 12·768² + 13·768 = 7,087,872 each; wte 50257·768; wpe 1024·768; ln_f 2·768.
  assert p["by_layer"]["h_0"] == p["by_layer"]["h_11"] == p["formula_per_block"] == 7_087_872
  assert p["by_layer"]["wte"] == 38_597_376 and p["by_layer"]["wpe"] == 786_432
  assert p["by_kind"]["embedding"] == 38_597_376 + 786_432
  row = next(t for t in r["tensors"] if t["path"] == "h_3/mlp/fc/kernel")
  assert row["shape"] == [768, 3072] and row["kind"] == "weight"
  assert row["logical_axes"] == ["embed", "mlp"] and row["dtype"] == "float32"
  kinds = {t["path"].rsplit("/", 1)[-1]: t["kind"] for t in r["tensors"]}
  assert kinds == {"embedding": "embedding", "kernel": "weight", "bias": "bias",
                   "scale": "norm scale"}


def test_gpt2_medium_has_354_823_168_parameters():
  r = report_for("gpt2_medium")
  assert r["params"]["total"] == 354_823_168 == r["params"]["formula_total"]


def test_no_bias_config_reports_zero_biases():
  r = report_for("gpt2_small", model__bias=False)
  assert r["params"]["by_kind"]["bias"] == 0 == r["params"]["formula_by_kind"]["bias"]
  assert not [t for t in r["tensors"] if t["kind"] == "bias"]
  assert r["params"]["total"] == 124_439_808 - 102_144  # GPT-2 small's biases, counted by hand.


@pytest.mark.parametrize("overrides", [
    {"model__tie_embeddings": False},
    {"model__n_kv_head": 2},
    {"model__n_kv_head": 1, "model__bias": False},
    {"model__d_ff": 100, "model__n_layer": 3},
])
def test_formula_matches_the_flax_tree_for_other_architectures(overrides):
  r = report_for("smoke", **overrides)
  assert r["params"]["by_kind"] == r["params"]["formula_by_kind"]
  assert r["params"]["total"] == r["params"]["formula_total"]
  assert not r["warnings"]


def test_scanned_layers_report_the_same_counts_per_layer():
  plain, scanned = report_for("smoke"), report_for("smoke", model__scan_layers=True)
  assert scanned["params"]["by_layer"] == plain["params"]["by_layer"]
  assert scanned["params"]["by_kind"] == plain["params"]["by_kind"]
  row = next(t for t in scanned["tensors"] if t["path"] == "h/mlp/fc/kernel")
  assert row["shape"] == [2, 32, 128] and row["logical_axes"] == ["layers", "embed", "mlp"]
  assert scanned["memory"]["bytes"] == plain["memory"]["bytes"]


def test_config_report_allocates_nothing():
  # A 7B-like shape reports in well under a second of tracing: shapes only, no arrays.
  r = report_for("gpt2_small", model__n_layer=32, model__d_model=4096, model__n_head=32,
                 model__vocab_size=32000, model__block_size=2048)
  assert r["params"]["total"] == r["params"]["formula_total"] > 6_000_000_000


# --- Compute and memory -------------------------------------------------------------------------

def test_flops_per_token_by_hand():
  # smoke: V=65, D=32, T=16, 2 layers, F=128, biases, tied embeddings.
  # N (all but wpe) = wte 65·32 + 2·(12·32² + 13·32) + ln_f 2·32 = 2080 + 25408 + 64 = 27552.
  # 6·N + 12·n_layer·d_model·block_size = 165312 + 12·2·32·16 = 165312 + 12288 = 177600.
  r = report_for("smoke")
  assert r["params"]["matmul"] == 27_552
  assert r["compute"]["flops_per_token"] == 177_600
  assert r["compute"]["tokens_per_step"] == 8 * 16
  assert r["compute"]["flops_per_step"] == 177_600 * 128
  assert "all but the position embeddings" in params.FLOPS_CONVENTION


def test_step_time_from_a_known_device():
  cfg = load_config("gpt2_small")
  r = params.config_report(cfg, n_devices=8, device="tpu V4", mfu=0.5)
  c = r["compute"]
  assert c["device"] == "TPU v4" and c["peak_tflops_per_device"] == 275.0
  assert math.isclose(c["step_time_sec"], c["flops_per_step"] / (8 * 275e12 * 0.5))
  assert r["memory"]["device_memory_gib"] == 32.0 and r["memory"]["fits"] is True
  with pytest.raises(JaxlmError, match="unknown --device='TPU v9'"):
    params.config_report(cfg, n_devices=8, device="TPU v9")


@pytest.mark.parametrize("name, b1, per_param", [
    ("adamw", 0.9, 2.0), ("lion", 0.9, 1.0), ("sgd", 0.9, 1.0), ("sgd", 0.0, 0.0)])
def test_optimizer_state_by_optimizer(name, b1, per_param):
  r = report_for("smoke", optim__name=name, optim__b1=b1)
  assert r["memory"]["optimizer_state_per_param"] == pytest.approx(per_param, abs=1e-3)
  b = r["memory"]["bytes"]
  assert b["params"]["total"] == 4 * r["params"]["total"] == b["gradients"]["total"]


def test_fsdp_shards_params_and_optimizer_state_per_device():
  r = report_for("gpt2_small", mesh__data=1, mesh__fsdp=8)
  b = r["memory"]["bytes"]
  # Tensors with an embed dimension (768 = 8·96) are split 8 ways; the q, k/v and fc biases
  # (768 + 2·768 + 3072 = 5376 floats per block, no embed axis) are replicated.
  replicated = 4 * 12 * 5376
  assert b["params"]["per_device"] == (b["params"]["total"] - replicated) // 8 + replicated
  assert b["optimizer_state"]["per_device"] < b["optimizer_state"]["total"] / 7.9
  # Batch 480 over 8 devices in 4 microbatches: 15 sequences per device at a time.
  assert r["memory"]["batch_per_device"] == 15


def test_activation_estimate_by_hand():
  # smoke, float32 (c = 4): per block c·(6·32 + 2·32 + 2·128) + 4·H·T = 2048 + 256 = 2304;
  # two blocks 4608; once per token 2·D·c + 2·4·V = 256 + 520 = 776; total 5384 bytes.
  mcfg = config_lib.model_config(load_config("smoke"), 65)
  assert params.activation_bytes_per_token(mcfg) == 5384
  # model.remat keeps less per block, plus one block's full activations during recomputation:
  # "full" the block input (D·c = 128 bytes); "dots" also q, k/v, both projections and fc,
  # c·(4·D + 2·G·K + F) = 4·(128 + 64 + 128) = 1280 bytes.
  remat = {r: dataclasses.replace(mcfg, remat=r) for r in ("full", "dots")}
  assert params.activation_bytes_per_token(remat["full"]) == 2 * 128 + 2304 + 776
  assert params.activation_bytes_per_token(remat["dots"]) == 2 * 1280 + 2304 + 776
  r = report_for("smoke")
  # 8 sequences over 8 devices: one 16-token sequence per device.
  assert r["memory"]["bytes"]["activations"]["per_device"] == 5384 * 16


def test_too_large_for_the_device_warns_with_the_shortfall():
  cfg = load_config("gpt2_medium")
  r = params.config_report(cfg, n_devices=8, device_memory_gib=4.0)
  assert r["memory"]["fits"] is False
  need = r["memory"]["bytes"]["total"]["per_device"] / params.GIB
  [warning] = [w for w in r["warnings"] if "does not fit" in w]
  assert f"needs {need:.2f} GiB per device" in warning
  assert f"{need - 4.0:.2f} GiB short" in warning and "4 GiB" in warning
  assert "WARNING: does not fit" in params.format_config_text(r)
  assert params.config_report(cfg, n_devices=8, device_memory_gib=80.0)["memory"]["fits"]


def test_text_report_shows_both_kinds_of_parameter():
  text = params.format_config_text(report_for("smoke"))
  assert "Hyperparameters: chosen by a person" in text
  assert "Parameters: learned" in text
  assert "h_1/mlp/proj/kernel" in text and "norm scale" in text
  assert "sample.temperature" in text and "optim.lr" in text
  assert "analytic formula matches" in text and "177,600" not in text  # Printed as 1.776e+05.
  assert "1.776e+05" in text


# --- Per-layer stats inside the train step ---------------------------------------------------

def per_layer(tree, scanned):
  """{layer: subtree}, the stacked blocks of a scanned model sliced into h_0, h_1, ..."""
  out = {k: v for k, v in tree.items() if not (scanned and k == "h")}
  if scanned:
    n = jax.tree.leaves(tree["h"])[0].shape[0]
    out.update({f"h_{i}": jax.tree.map(lambda x, i=i: np.asarray(x)[i], tree["h"])
                for i in range(n)})
  return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_layer_stats_from_inside_the_step_equal_host_norms(scan_layers):
  cfg = load_config("smoke")
  cfg.model.scan_layers = scan_layers
  model, tx, state = smoke_state(cfg)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, layer_stats=True))
  batch, rng = random_batch(8, 16), jax.random.key(1)
  for _ in range(3):  # Past warmup's lr = 0 at step 0, so the updates are not zero.
    old = state
    state, m = step(state, batch, rng)
  m = jax.device_get(m)

  def host_norm(tree):
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                         for x in jax.tree.leaves(tree)))

  grads = jax.jit(jax.grad(lambda p: step_lib.loss_fn(
      p, batch, jax.random.fold_in(rng, 2), model=model, z_loss=0.0)[0]))(old.params)
  new_layers, old_layers = per_layer(state.params, scan_layers), per_layer(old.params, scan_layers)
  grad_layers = per_layer(grads, scan_layers)
  assert set(new_layers) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
  for name in new_layers:
    p_norm = host_norm(new_layers[name])
    np.testing.assert_allclose(m[f"params/norm/{name}"], p_norm, rtol=1e-5)
    np.testing.assert_allclose(m[f"grads/norm/{name}"], host_norm(grad_layers[name]), rtol=1e-4)
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                         new_layers[name], old_layers[name])
    np.testing.assert_allclose(m[f"update_ratio/{name}"], host_norm(delta) / p_norm, rtol=1e-3)
    assert m[f"update_ratio/{name}"] > 0
  np.testing.assert_allclose(m["params/norm"], host_norm(state.params), rtol=1e-5)
  np.testing.assert_allclose(m["params/norm"], m["param_norm"], rtol=1e-6)
  np.testing.assert_allclose(m["grads/norm"], m["grad_norm"], rtol=1e-6)
  assert all(k.startswith(metrics.LAYER_STAT_PREFIXES)
             for k in m if k not in ("loss", "grad_norm", "param_norm"))


def test_layer_stats_are_off_by_default_and_validated():
  cfg = load_config("smoke")
  model, tx, state = smoke_state(cfg)
  _, m = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))(
      state, random_batch(8, 16), jax.random.key(1))
  assert set(m) == {"loss", "grad_norm", "param_norm"}
  cfg.train.log_params_every = 7  # log_every is 5.
  with pytest.raises(JaxlmError, match="log_params_every=7 must be 0 .* multiple of"):
    config_lib.validate_config(cfg)


@pytest.mark.slow
def test_training_writes_layer_stats_on_their_steps(tmp_path):
  cfg = load_config("smoke")
  cfg.train.log_params_every = 10
  cfg.train.eval_every = 0
  workdir = tmp_path / "run"
  train.train_and_evaluate(cfg, str(workdir))
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  with_stats = [r["step"] for r in records if "params/norm/h_0" in r]
  assert with_stats == [10, 20, 30]
  r = next(r for r in records if r["step"] == 30 and "params/norm/h_0" in r)
  assert {"grads/norm/h_1", "update_ratio/wte", "params/norm", "update_ratio"} <= set(r)
  assert math.isclose(r["params/norm"], r["param_norm"], rel_tol=1e-6)


# --- Drift from init ----------------------------------------------------------------------------

def smoke_model_and_init(seed=0, scan_layers=False):
  cfg = load_config("smoke")
  cfg.model.scan_layers = scan_layers
  model = model_lib.make_model(config_lib.model_config(cfg, 65))
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  # The init exactly as train_and_evaluate builds it: jitted, created sharded on an FSDP mesh.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  training = build_lib.make_sharded_training(model, tx, mesh, sharding.get_rules("fsdp"))
  return model, tx, training.init(step_lib.init_rngs(seed)[0])


def test_drift_is_exactly_zero_at_init():
  model, _, state = smoke_model_and_init(seed=3)
  report = params.drift_report(state.params, params.initial_params(model, seed=3))
  assert report["global"]["delta_norm"] == 0.0 and report["global"]["drift"] == 0.0
  for row in report["tensors"]:
    assert row["delta_rms"] == 0.0
    assert row["drift"] == (None if row["init_norm"] == 0 else 0.0)
  assert {t["kind"] for t in report["tensors"] if t["drift"] is None} == {"bias"}
  # The scales start at one and everything else at N(0, 0.02²) or (residual projections) less.
  row = next(t for t in report["tensors"] if t["path"] == "ln_f/scale")
  assert row["rms"] == row["mean"] == 1.0 and row["std"] == 0.0
  row = next(t for t in report["tensors"] if t["path"] == "h_0/mlp/fc/kernel")
  assert abs(row["std"] - 0.02) < 0.002
  # A different seed is a different init: two independent draws are √2 apart.
  other = params.drift_report(state.params, params.initial_params(model, 4))
  row = next(t for t in other["tensors"] if t["path"] == "h_0/mlp/fc/kernel")
  assert abs(row["drift"] - math.sqrt(2)) < 0.05


def test_drift_grows_during_a_short_run(tmp_path):
  model, tx, state = smoke_model_and_init()
  params0 = params.initial_params(model, seed=0)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  batch, rng = random_batch(8, 16), jax.random.key(1)
  drifts = []
  for n in range(12):
    state, _ = step(state, batch, rng)
    if n in (2, 5, 11):
      drifts.append(params.drift_report(state.params, params0))
  global_drift = [d["global"]["drift"] for d in drifts]
  assert 0 < global_drift[0] < global_drift[1] < global_drift[2]
  last = drifts[-1]
  assert all(last["by_layer"][n]["drift"] > 0 for n in last["by_layer"])
  assert last["by_kind"]["bias"]["drift"] is None and last["by_kind"]["bias"]["delta_rms"] > 0
  assert len(last["most_changed"]) == 5
  # The text and the plot of a run report (run_report adds these fields to drift_report's).
  last.update(workdir="runs/x", step=12, seed=0, total=28_064, warnings=[])
  text = params.format_run_text(last)
  assert "h_0/mlp/fc/kernel" in text and "Most changed" in text
  png = tmp_path / "drift.png"
  params.plot_drift(last, str(png))
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drift_of_a_scanned_model_is_reported_per_layer():
  model, _, state = smoke_model_and_init(seed=0, scan_layers=True)
  params0 = params.initial_params(model, seed=0)
  jax.tree.map(np.testing.assert_array_equal, state.params, params0)
  report = params.drift_report(state.params, params0, scanned=True)
  assert report["global"]["delta_norm"] == 0.0
  assert list(report["by_layer"]) == ["wte", "wpe", "h_0", "h_1", "ln_f"]
  assert "h_1/mlp/fc/kernel" in {t["path"] for t in report["tensors"]}


def test_drift_rejects_params_that_do_not_match_the_init():
  zeros = {"h_0": {"kernel": np.zeros((2, 3))}, "h_1": {"kernel": np.zeros((3,))}}
  with pytest.raises(JaxlmError, match="h_1/kernel has no counterpart"):
    params.drift_report(zeros, {"h_0": zeros["h_0"]})
  with pytest.raises(JaxlmError, match="h_0/kernel has shape"):
    params.drift_report(zeros, {"h_0": {"kernel": np.zeros((3, 2))}, "h_1": zeros["h_1"]})


@pytest.mark.slow
def test_run_report_drift_is_zero_at_step_0_and_grows(tmp_path):
  cfg = load_config("smoke")
  cfg.train.eval_every = 0
  cfg.train.steps = 0  # A run of zero steps still saves its initial state, at step 0.
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(cfg, workdir)
  cfg.train.steps, cfg.checkpoint.every = 20, 10  # The same run continued to step 20.
  train.train_and_evaluate(cfg, workdir)
  at = {step: params.run_report(workdir, step) for step in (0, 10, 20)}
  assert at[0]["step"] == 0 and at[0]["seed"] == cfg.seed and at[0]["total"] == 28_064
  assert at[0]["global"]["delta_norm"] == 0.0 and at[0]["global"]["drift"] == 0.0
  assert all(t["delta_rms"] == 0.0 for t in at[0]["tensors"])
  assert 0 < at[10]["global"]["drift"] < at[20]["global"]["drift"]
  assert params.run_report(workdir)["step"] == 20  # Default: the latest checkpoint.
  # The same through the console script, with the plot.
  png = tmp_path / "drift.png"
  proc = jaxlm("params", "--workdir", workdir, "--step", "10", "--plot", str(png))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "at step 10" in proc.stdout and "Most changed" in proc.stdout
  assert png.read_bytes()[:4] == b"\x89PNG"
  proc = jaxlm("params", "--workdir", workdir, "--format", "json")
  assert json.loads(proc.stdout)["step"] == 20


def test_run_report_of_a_missing_run_is_a_one_line_error(tmp_path):
  with pytest.raises(JaxlmError, match="no run in"):
    params.run_report(str(tmp_path / "nothing"))


# --- The console script -------------------------------------------------------------------------

def jaxlm(*args, timeout=120):
  script = os.path.join(os.path.dirname(sys.executable), "jaxlm")
  return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout,
                        cwd=REPO)


def test_cli_json_for_gpt2_small():
  proc = jaxlm("params", "--config", os.path.join(CONFIGS, "gpt2_small.py"), "--format",
               "json", "--device", "TPU v4", "--num_devices", "8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  assert report["params"]["total"] == 124_439_808
  assert report["memory"]["fits"] is True and report["compute"]["step_time_sec"] > 0
  assert report["config"].endswith("gpt2_small.py")


def test_cli_text_warns_when_it_does_not_fit_and_rejects_bad_flags():
  proc = jaxlm("params", "--config", os.path.join(CONFIGS, "gpt2_medium.py"),
               "--device_memory_gb", "2", "--config.model.n_layer=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "WARNING: does not fit" in proc.stdout and "GiB short" in proc.stderr
  assert "Parameters: learned" in proc.stdout
  proc = jaxlm("params", "--config", os.path.join(CONFIGS, "smoke.py"), "--plot", "x.png")
  assert proc.returncode == 2 and "jaxlm: error: --step and --plot need --workdir" in proc.stderr
  proc = jaxlm("params")
  assert proc.returncode == 2 and "jaxlm: error: give --config" in proc.stderr
