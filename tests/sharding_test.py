"""Scale-out: meshes, sharded numerics vs one device, multi-process runs, scan and remat."""

import functools
import json
import math
import os
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIGS, REPO, jaxlm_script, load_config, run_jaxlm

from jaxlm import axes, data, optim, sharding
from jaxlm import build as build_lib
from jaxlm import model as model_lib
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError
from jaxlm.host import launch as launch_lib

SMOKE = os.path.join(CONFIGS, "smoke.py")


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(JaxlmError, match="has 4 devices but there are 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(JaxlmError, match="at most one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(JaxlmError, match="not divisible by 3"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def run_steps(mesh_shape, rules_name, n_steps=3, vocab=64, grad_accum=1, dropout_rng="",
              optimizer="adamw", **model_overrides):
  """A few training steps of the smoke model on a mesh; returns (losses, final state)."""
  cfg = load_config("smoke")
  cfg.train.dropout_rng = dropout_rng or cfg.train.dropout_rng
  cfg.train.steps, cfg.optim.name = 10, optimizer
  for k, v in model_overrides.items():
    cfg.model[k] = v
  recipe = build_lib.make_recipe(cfg, vocab)  # Groups (muon) need the model's params.
  model, tx = recipe.model, recipe.tx
  n = math.prod(mesh_shape)
  mesh = sharding.make_mesh(dict(zip(axes.MESH_AXES, mesh_shape, strict=True)),
                            jax.devices()[:n])
  training = build_lib.make_sharded_training(model, tx, mesh, sharding.get_rules(rules_name),
                                             grad_accum=grad_accum)
  state = training.init(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, vocab, size=5000).astype(np.uint16)
  losses = []
  for s in range(n_steps):
    batch = data.get_batch(tokens, seed=0, step=s, batch_size=8, block_size=16)
    stacked = {k: v[None] for k, v in batch.items()}  # One step per call.
    state, m = training.steps(state, sharding.host_to_global(stacked, training.batch_sharding),
                              jax.random.key(1))
    losses.append(float(m["loss"][0]))
  return losses, state


@pytest.mark.parametrize("mesh_shape, rules", [
    ((8, 1, 1), "dp"), ((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp"), ((1, 2, 4), "fsdp_tp")])
def test_sharded_training_equals_one_device(mesh_shape, rules):
  ref_losses, ref_state = run_steps((1, 1, 1), "fsdp")
  losses, state = run_steps(mesh_shape, rules)
  # Only the order of float reductions differs between meshes: tolerance 1e-5 (float32).
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(state.params), jax.device_get(ref_state.params))

  # Parameters really are laid out as the rules say.
  fc = state.params["h_0"]["mlp"]["fc"]["kernel"]  # [D, F]: logical (embed, mlp).
  query = state.params["h_0"]["attn"]["query"]["kernel"]  # [D, H, K]
  mu = state.opt_state[1][0].mu["h_0"]["mlp"]["fc"]["kernel"]  # Adam moment: same layout.
  expected = {"dp": (None, None), "fsdp": ("fsdp", None), "fsdp_tp": ("fsdp", "tensor")}[rules]
  for array in (fc, mu):
    assert tuple(array.sharding.spec) + (None,) * (2 - len(array.sharding.spec)) == expected
  if rules == "fsdp_tp":
    assert query.sharding.spec[1] == "tensor"
    shard_shape = fc.sharding.shard_shape(fc.shape)
    assert shard_shape == (32 // mesh_shape[1], 128 // mesh_shape[2])


@pytest.fixture(scope="module")
def muon_on_one_device():
  return run_steps((1, 1, 1), "fsdp", n_steps=6, optimizer="muon")


@pytest.mark.parametrize("mesh_shape, rules", [((1, 8, 1), "fsdp"), ((1, 4, 2), "fsdp_tp")])
def test_sharded_muon_equals_one_device(mesh_shape, rules, muon_on_one_device):
  """Muon (optax's per-tensor Newton-Schulz under GSPMD) on sharded matrices, 6 steps.

  Tolerance: losses 1e-5 relative, params 1e-5 absolute (weights are 0.02-1). Newton-Schulz
  runs in float32 and its matmuls (X X^T over a sharded embed or tensor dimension) are summed
  in another order on every mesh; the matrix is first divided by its Frobenius norm, so the
  iteration works on O(1) values and its rounding stays at float32's level, the same order as
  adamw's (experiments/muon_sharding/ has both measured).
  """
  ref_losses, ref_state = muon_on_one_device
  losses, state = run_steps(mesh_shape, rules, n_steps=6, optimizer="muon")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               jax.device_get(state.params), jax.device_get(ref_state.params))
  # Muon's momentum is laid out as its matrix: sharded along embed over fsdp.
  is_muon = lambda x: isinstance(x, optax.contrib.MuonState)
  (muon_state,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_muon) if is_muon(x)]
  mu = muon_state.mu["h_0"]["mlp"]["fc"]["kernel"]
  assert mu.sharding.spec[0] == "fsdp"
  if rules == "fsdp_tp":
    assert mu.sharding.spec[1] == "tensor"


@pytest.mark.parametrize("dropout_rng", ["threefry2x32", "hash"])
def test_dropout_masks_do_not_depend_on_the_mesh(dropout_rng):
  """Masks are functions of (key, global index): 8-way data + tensor sharding draws the same."""
  ref_losses, _ = run_steps((1, 1, 1), "fsdp", dropout=0.3, dropout_rng=dropout_rng)
  losses, _ = run_steps((2, 1, 4), "fsdp_tp", dropout=0.3, dropout_rng=dropout_rng)
  no_dropout, _ = run_steps((1, 1, 1), "fsdp")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert abs(losses[-1] - no_dropout[-1]) > 1e-3  # Dropout was on.


def test_local_position_names_this_process_slice_of_the_mesh():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})  # 4 x 2 x 1 of 8 devices.
  assert sharding.local_position(mesh) == "data 0-3, fsdp 0-1, tensor 0"
  assert sharding.local_position(mesh, process_index=1) == "no devices"


def test_undivisible_dimension_is_replicated_not_an_error():
  losses, state = run_steps((1, 2, 4), "fsdp_tp", vocab=65)  # 65 % 4 != 0.
  ref_losses, _ = run_steps((1, 1, 1), "fsdp", vocab=65)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  wte = state.params["wte"]["embedding"]  # [V, D]: V stays whole, D is still fsdp-sharded.
  assert wte.sharding.spec[0] is None and wte.sharding.spec[1] == "fsdp"


def test_replicated_dimension_is_named_once_per_parameter(caplog):
  """The warning names parameters by path (wte/embedding), not once more per Adam moment."""
  model = model_lib.make_model(model_lib.ModelConfig(vocab_size=65, block_size=16, n_layer=1,
                                                     n_head=4, d_model=32))
  tx = optim.make_optimizer(load_config("smoke").optim, total_steps=10)
  boxed = jax.eval_shape(lambda r: step_lib.init_boxed_state(r, model=model, tx=tx),
                         jax.random.key(0))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, jax.devices()[:8])
  with caplog.at_level("WARNING"):
    sharding.logical_shardings(boxed, mesh, sharding.get_rules("fsdp_tp"))
  assert "replicating 1 dimension(s)" in caplog.text, caplog.text
  assert "e.g. wte/embedding[0]=65" in caplog.text, caplog.text


def test_scan_over_layers_gives_the_same_loss_as_unrolled():
  cfg = model_lib.ModelConfig(vocab_size=64, block_size=16, n_layer=3, n_head=4, d_model=32)
  unrolled = model_lib.make_model(cfg)
  scanned = model_lib.make_model(model_lib.ModelConfig(**{**cfg.__dict__, "scan_layers": True}))
  params = nn.unbox(model_lib.init_params(unrolled, jax.random.key(0)))
  stacked = {k: v for k, v in params.items() if not k.startswith("h_")}
  stacked["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"h_{i}"] for i in range(3)])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 17)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss = functools.partial(step_lib.loss_fn, batch=batch, rng=jax.random.key(0), z_loss=0.0)
  (a, _), (b, _) = loss(params, model=unrolled), loss(stacked, model=scanned)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # And the scanned stack is annotated for sharding along its new leading axis.
  boxed = jax.eval_shape(lambda r: model_lib.init_params(scanned, r), jax.random.key(0))
  assert boxed["h"]["mlp"]["fc"]["kernel"].names == (axes.LAYERS, axes.EMBED, axes.MLP)


@pytest.mark.parametrize("policy", ["full", "dots"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_the_same_gradients(policy, scan):
  base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_model=32, scan_layers=scan)
  plain = model_lib.make_model(model_lib.ModelConfig(**base))
  remat = model_lib.make_model(model_lib.ModelConfig(**base, remat=policy))
  params = nn.unbox(model_lib.init_params(plain, jax.random.key(0)))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 17)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def grads(model):
    fn = functools.partial(step_lib.loss_fn, batch=batch, rng=jax.random.key(0), model=model,
                           z_loss=0.0)
    return jax.jit(jax.grad(lambda p: fn(p)[0]))(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads(plain), grads(remat))


def test_sharded_grad_accumulation_equals_full_batch():
  full, state_full = run_steps((2, 2, 2), "fsdp_tp", n_steps=2)
  accum, state_accum = run_steps((2, 2, 2), "fsdp_tp", n_steps=2, grad_accum=2)
  np.testing.assert_allclose(accum, full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(state_accum.params), jax.device_get(state_full.params))


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {(r["step"], k): r[k] for r in records for k in ("train/loss", "val/loss") if k in r}


def launch(workdir, num_processes, devices, *extra):
  return run_jaxlm("launch", f"--num_processes={num_processes}",
                   f"--devices_per_process={devices}", "--timeout=400", "--init_timeout=120",
                   "--", "train", "--config", SMOKE, "--workdir", str(workdir),
                   "--config.train.steps=20", "--config.checkpoint.every=5", *extra,
                   timeout=450)


@pytest.mark.slow
def test_two_processes_match_one_process_and_share_checkpoints(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  for workdir, n, d in ((one, 1, 4), (two, 2, 2)):
    proc = launch(workdir, n, d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if n == 2:  # Every host logs its index, its devices and its place in the mesh.
      assert "process 0 of 2: 2 of 4 devices" in proc.stderr, proc.stderr[-3000:]
      assert "process 1 of 2: 2 of 4 devices" in proc.stderr
      assert "this process holds data 0-1" in proc.stderr
      assert "this process holds data 2-3" in proc.stderr
  a, b = train_losses(one), train_losses(two)
  assert sorted(a) == sorted(b) and len(a) >= 6
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)

  # A checkpoint written by two processes resumes in one, and vice versa.
  for first, second, name in (((2, 2), (1, 4), "two_then_one"), ((1, 4), (2, 2), "one_then_two")):
    workdir = tmp_path / name
    proc = launch(workdir, *first, "--config.train.stop_at=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(workdir, *second)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint at step 10" in proc.stderr
    resumed = train_losses(workdir)
    later = [key for key in sorted(a) if key[0] > 10]
    np.testing.assert_allclose([resumed[k] for k in later], [a[k] for k in later], rtol=1e-5)


@pytest.mark.slow
def test_a_peer_that_dies_is_reported_by_the_launcher(tmp_path):
  marker = str(tmp_path / "dies")
  proc = subprocess.Popen(
      [jaxlm_script(), "launch", "--num_processes=2", "--devices_per_process=1",
       "--init_timeout=8", "--heartbeat_timeout=8", "--timeout=200", "--", "train",
       "--config", SMOKE, "--workdir", marker, "--config.train.steps=100000"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  try:
    victim = None
    deadline = time.time() + 60
    while victim is None and time.time() < deadline:  # Kill process 1 as soon as it exists.
      out = subprocess.run(["pgrep", "-f", f"{marker}.*process_id=1"], capture_output=True,
                           text=True).stdout.split()
      victim = int(out[0]) if out else None
      time.sleep(0.05)
    assert victim, "process 1 never started"
    os.kill(victim, 9)
    _, err = proc.communicate(timeout=240)
  finally:
    proc.kill()
  assert proc.returncode != 0
  lines = [line for line in err.splitlines() if line.startswith("jaxlm: error:")]
  assert lines and "process 1" in lines[0], err[-3000:]


def test_batch_sharding_and_divisor_follow_the_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.batch_divisor(mesh, sharding.get_rules("dp")) == 8
  assert sharding.batch_divisor(mesh, sharding.get_rules("fsdp_tp")) == 4


def test_logical_ways_from_a_mesh_or_from_config_sizes():
  sizes = {"data": 2, "fsdp": 3, "tensor": 4}
  fsdp_tp = sharding.get_rules("fsdp_tp")
  assert sharding.split_ways(None, sizes) == 1
  assert sharding.split_ways("tensor", sizes) == 4
  assert sharding.split_ways(("data", "fsdp"), sizes) == 6
  assert [sharding.logical_ways(a, fsdp_tp, sizes)
          for a in (axes.BATCH, axes.EMBED, axes.HEADS, axes.HEAD_DIM)] == [6, 3, 4, 1]
  assert sharding.logical_ways(axes.HEADS, sharding.get_rules("dp"), sizes) == 1
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_ways(axes.BATCH, fsdp_tp, mesh.shape) == 4


@pytest.mark.slow
def test_a_peer_that_never_arrives_is_a_clear_error(tmp_path):
  proc = run_jaxlm("launch", "--num_processes=2", "--process_ids=0", "--devices_per_process=1",
                   "--init_timeout=5", f"--coordinator=127.0.0.1:{launch_lib.free_port()}",
                   "--timeout=200", "--", "train", "--config", SMOKE, "--workdir",
                   str(tmp_path / "w"), timeout=250)
  assert proc.returncode == launch_lib.ABORTED
  lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxlm: error:")]
  assert lines and "never joined within distributed.init_timeout=5s" in lines[0], proc.stderr
