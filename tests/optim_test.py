"""Optimizer and schedule: closed-form learning rates, optax references, decay mask, clipping."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from jaxlm import config as config_lib
from jaxlm import defaults, optim
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

# The optimizers that existed before groups; their references and closed forms are below.
CLASSIC = ("adamw", "lion", "sgd")


def opt_config(**overrides):
  cfg = defaults.base_config().optim
  cfg.update(overrides)
  return cfg


def closed_form_lr(step, *, lr, min_lr, warmup, total):
  """Linear warmup from 0 over `warmup` steps, then cosine from lr down to min_lr at `total`."""
  if step < warmup:
    return lr * step / warmup
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- Schedule -----------------------------------------------------------------------------------

def test_schedule_values_equal_the_closed_form():
  cfg = opt_config(lr=1e-3, min_lr=2e-4, warmup_steps=10)
  sched = optim.make_schedule(cfg, 110)
  for step in (0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 111, 500):
    expected = closed_form_lr(step, lr=1e-3, min_lr=2e-4, warmup=10, total=110)
    assert math.isclose(float(sched(step)), expected, rel_tol=1e-6, abs_tol=1e-12), step
  # Landmarks, written out: 0 at the start, the peak after warmup, the midpoint of the cosine
  # halfway through the decay, min_lr at the end and after it.
  assert float(sched(0)) == 0.0
  assert math.isclose(float(sched(5)), 5e-4, rel_tol=1e-6)
  assert math.isclose(float(sched(10)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(sched(60)), 6e-4, rel_tol=1e-6)
  assert math.isclose(float(sched(110)), 2e-4, rel_tol=1e-6)
  assert math.isclose(float(sched(1000)), 2e-4, rel_tol=1e-6)


def test_schedule_rises_during_warmup_then_never_rises():
  sched = optim.make_schedule(opt_config(lr=3e-3, min_lr=3e-4, warmup_steps=5), 30)
  values = np.array([float(sched(s)) for s in range(40)])
  assert np.all(np.diff(values[:6]) > 0)
  assert np.all(np.diff(values[5:]) <= 1e-12)
  assert values[5:].min() >= 3e-4 * (1 - 1e-6)  # Never below min_lr, even after the end.


def test_schedule_without_warmup_starts_at_the_peak():
  sched = optim.make_schedule(opt_config(lr=0.1, min_lr=0.02, warmup_steps=0), 10)
  for step in range(12):
    expected = closed_form_lr(step, lr=0.1, min_lr=0.02, warmup=0, total=10)
    assert math.isclose(float(sched(step)), expected, rel_tol=1e-6), step
  assert math.isclose(float(sched(0)), 0.1, rel_tol=1e-6)


@pytest.mark.parametrize("total", [1, 3, 5])
def test_schedule_with_warmup_longer_than_the_run_is_linear_to_lr_at_the_last_step(total):
  """warmup_steps >= steps: the warmup shrinks to the run, reaching lr at `total`."""
  sched = optim.make_schedule(opt_config(lr=3e-3, min_lr=3e-4, warmup_steps=5), total)
  for step in range(total + 3):
    expected = 3e-3 * min(step, total) / total
    assert math.isclose(float(sched(step)), expected, rel_tol=1e-6, abs_tol=1e-12), step


def test_schedule_of_a_zero_step_run():
  sched = optim.make_schedule(opt_config(lr=3e-3, warmup_steps=5), 0)
  assert float(sched(0)) == 0.0 and math.isclose(float(sched(1)), 3e-3, rel_tol=1e-6)


# --- Optimizers against optax references ---------------------------------------------------------

def quadratic_problem(seed=0):
  """Params named like the model's (kernel, embedding, bias, scale) and a quadratic loss."""
  rng = np.random.default_rng(seed)
  shapes = {"dense": {"kernel": (3, 4), "bias": (4,)}, "ln": {"scale": (4,)},
            "wte": {"embedding": (5, 3)}, "attn": {"query": {"kernel": (4, 2, 2),
                                                              "bias": (2, 2)}}}
  is_shape = lambda x: isinstance(x, tuple)
  draw = lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  params = jax.tree.map(draw, shapes, is_leaf=is_shape)
  target = jax.tree.map(draw, shapes, is_leaf=is_shape)
  curvature = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s), jnp.float32),
                           shapes, is_leaf=is_shape)

  def loss(p):
    terms = jax.tree.map(lambda x, t, c: jnp.sum(c * (x - t) ** 2), p, target, curvature)
    return sum(jax.tree.leaves(terms))
  # What should decay, written out by hand: kernels and embeddings, never biases or scales.
  mask = {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
          "wte": {"embedding": True}, "attn": {"query": {"kernel": True, "bias": False}}}
  return params, loss, mask


def reference_optimizer(name, cfg, total, mask):
  """The optax transformation jaxlm should build, from optax directly with an own schedule."""
  def sched(count):
    # The closed form above, in jnp (count is a traced int).
    warm = cfg.lr * count / max(cfg.warmup_steps, 1)
    progress = jnp.clip((count - cfg.warmup_steps) / (total - cfg.warmup_steps), 0.0, 1.0)
    cos = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < cfg.warmup_steps, warm, cos)
  if name == "adamw":
    opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=mask)
  elif name == "lion":
    opt = optax.lion(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
  else:
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                      optax.sgd(sched, momentum=cfg.b1))
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)


def run(tx, params, loss, steps):
  """The params after each of `steps` updates (one jitted step: fewer compilations)."""
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(params)
  return trajectory


@pytest.mark.parametrize("name", CLASSIC)
def test_optimizer_follows_the_optax_reference_and_lowers_the_loss(name):
  lr = {"adamw": 0.05, "lion": 0.05, "sgd": 0.02}[name]
  cfg = opt_config(name=name, lr=lr, min_lr=lr / 4, warmup_steps=2, weight_decay=0.1,
                   grad_clip=5.0)
  params, loss, mask = quadratic_problem()
  assert float(optax.tree.norm(jax.grad(loss)(params))) > 5.0  # Clipping is active at first.
  got = run(optim.make_optimizer(cfg, 8), params, loss, 8)
  want = run(reference_optimizer(name, cfg, 8, mask), params, loss, 8)
  for step, (g, w) in enumerate(zip(got, want, strict=True)):
    jax.tree.map(lambda a, b, s=step: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name} step {s + 1}"), g, w)
  assert float(loss(got[-1])) < 0.9 * float(loss(params))
  # The first update has lr 0 (warmup starts at 0): nothing moves, not even decay.
  jax.tree.map(np.testing.assert_array_equal, got[0], params)


@pytest.mark.parametrize("name", CLASSIC)
def test_first_update_equals_its_closed_form(name):
  """Step 0 without warmup runs at the peak lr; each optimizer's first step in numpy."""
  lr, wd = 0.1, 0.3
  cfg = opt_config(name=name, lr=lr, min_lr=0.01, warmup_steps=0, weight_decay=wd,
                   grad_clip=0.0)
  params, loss, mask = quadratic_problem(seed=1)
  grads = jax.grad(loss)(params)
  tx = optim.make_optimizer(cfg, 100)
  updates, _ = tx.update(grads, tx.init(params), params)

  def expected(p, g, decays):
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    decay = wd * p if decays else 0.0
    if name == "adamw":  # m_hat = g, v_hat = g^2 after bias correction.
      return -lr * (g / (np.abs(g) + cfg.eps) + decay)
    if name == "lion":  # sign(b1 * 0 + (1 - b1) * g) = sign(g).
      return -lr * (np.sign(g) + decay)
    return -lr * (g + decay)  # sgd: the first momentum trace is the gradient itself.
  want = jax.tree.map(expected, params, grads, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               updates, want)


@pytest.mark.parametrize("b1", [0.9, 0.0])
def test_sgd_momentum_is_b1_and_b1_zero_is_plain_sgd(b1):
  """Second step: the momentum trace is g2 + b1 * g1 (b1 = 0: no momentum, just g2)."""
  params, loss, _ = quadratic_problem(seed=2)
  cfg = opt_config(name="sgd", lr=0.05, min_lr=0.05, warmup_steps=0, weight_decay=0.0,
                   grad_clip=0.0, b1=b1)
  tx = optim.make_optimizer(cfg, 100)
  state = tx.init(params)
  g1 = jax.grad(loss)(params)
  u1, state = tx.update(g1, state, params)
  p1 = optax.apply_updates(params, u1)
  g2 = jax.grad(loss)(p1)
  u2, _ = tx.update(g2, state, p1)
  want = jax.tree.map(lambda a, b: -0.05 * (np.asarray(b) + b1 * np.asarray(a)), g1, g2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u2, want)


def test_unknown_optimizer_name_is_a_jaxlm_error():
  with pytest.raises(JaxlmError, match=r"unknown optim.name='adagrad'.*adamw, lion, sgd"):
    optim.make_optimizer(opt_config(name="adagrad"), 10)
  assert issubclass(JaxlmError, ValueError)  # The CLI prints these as one-line errors.


# --- Weight decay mask ---------------------------------------------------------------------------

def test_decay_mask_is_by_parameter_name_not_by_rank():
  """kernel and embedding decay whatever their rank; bias and scale never (a 2-D bias too)."""
  tree = {"a": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))},
          "attn": {"query": {"kernel": jnp.zeros((4, 2, 2)), "bias": jnp.zeros((2, 2))}},
          "odd": {"kernel": jnp.zeros((5,)), "scale": jnp.zeros((2, 3))},
          "wte": {"embedding": jnp.zeros((7, 4))}, "ln_f": {"scale": jnp.zeros((4,))}}
  assert optim.decay_mask(tree) == {
      "a": {"kernel": True, "bias": False},
      "attn": {"query": {"kernel": True, "bias": False}},
      "odd": {"kernel": True, "scale": False},
      "wte": {"embedding": True}, "ln_f": {"scale": False}}


def test_decay_mask_of_boxed_model_params_matches_the_unboxed_one():
  model = model_lib.make_model(model_lib.ModelConfig(vocab_size=64, block_size=16, n_layer=2,
                                                     n_head=4, d_model=32))
  # Shapes suffice: the mask depends on the tree's names only.
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  unboxed_mask = optim.decay_mask(nn.unbox(boxed))
  assert nn.unbox(optim.decay_mask(boxed)) == unboxed_mask
  flat = {"/".join(k.key for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(unboxed_mask)[0]}
  decayed = {name for name, v in flat.items() if v}
  assert decayed == {name for name in flat if name.endswith(("/kernel", "/embedding"))}
  assert "wte/embedding" in decayed and "wpe/embedding" in decayed
  assert len(decayed) == 2 + 2 * 5  # wte, wpe; per block q, kv, out, fc, proj kernels.


@pytest.mark.parametrize("name", CLASSIC)
def test_weight_decay_shrinks_only_masked_params(name):
  """With zero gradients the whole update is decoupled decay: -lr * wd * p on masked leaves."""
  lr, wd = 0.1, 0.5
  cfg = opt_config(name=name, lr=lr, min_lr=lr, warmup_steps=0, weight_decay=wd, grad_clip=1.0)
  params, _, mask = quadratic_problem(seed=3)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_optimizer(cfg, 10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
    before = np.asarray(_get(params, path))
    after = np.asarray(_get(new, path))
    if decays:
      np.testing.assert_allclose(after, before * (1 - lr * wd), rtol=1e-6)
    else:
      np.testing.assert_array_equal(after, before)


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_zero_weight_decay_leaves_params_alone():
  cfg = opt_config(name="adamw", lr=0.1, warmup_steps=0, weight_decay=0.0)
  params, _, _ = quadratic_problem(seed=3)
  tx = optim.make_optimizer(cfg, 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, np.zeros_like(u)), updates)


# --- Gradient clipping ---------------------------------------------------------------------------

def clipping_problem(scale):
  """Two leaves with gradient norms 6 and 8 times `scale`: global norm 10 * scale."""
  params = {"a": {"kernel": jnp.zeros((2,))}, "b": {"kernel": jnp.zeros((1,))}}
  grads = {"a": {"kernel": jnp.asarray([6.0, 0.0]) * scale},
           "b": {"kernel": jnp.asarray([-8.0]) * scale}}
  return params, grads


def sgd_update(grad_clip, grads, params):
  """Plain SGD at lr 1, no decay: the update is minus the (clipped) gradient."""
  cfg = opt_config(name="sgd", lr=1.0, min_lr=1.0, warmup_steps=0, weight_decay=0.0, b1=0.0,
                   grad_clip=grad_clip)
  tx = optim.make_optimizer(cfg, 10)
  return tx.update(grads, tx.init(params), params)[0]


def test_grad_clip_scales_the_global_norm_down_to_the_limit():
  params, grads = clipping_problem(1.0)
  updates = sgd_update(2.0, grads, params)
  # One factor for all leaves (2 / 10), not a per-leaf clip (which would give each norm 2).
  np.testing.assert_allclose(updates["a"]["kernel"], [-1.2, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates["b"]["kernel"], [1.6], rtol=1e-6)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 2.0, rtol=1e-6)


def test_grad_clip_leaves_small_gradients_and_zero_turns_it_off():
  params, small = clipping_problem(0.1)  # Global norm 1 < 2.
  updates = sgd_update(2.0, small, params)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, small)
  _, big = clipping_problem(1.0)
  updates = sgd_update(0.0, big, params)  # Off: the norm-10 gradient passes unchanged.
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, big)


# Moved from tests/train_test.py with the restructure.

def test_weight_decay_mask_covers_kernels_and_embeddings_only():
  cfg = load_config("smoke")
  model = model_lib.make_model(config_lib.model_config(cfg, 65))
  params = nn.unbox(model_lib.init_params(model, jax.random.key(0)))
  mask = optim.decay_mask(params)
  flat = {"/".join(k.key for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["wte/embedding"] and flat["h_0/mlp/fc/kernel"] and flat["h_1/attn/query/kernel"]
  assert not flat["h_0/mlp/fc/bias"] and not flat["ln_f/scale"]
  assert not flat["h_0/attn/query/bias"]  # A 2-D bias is still a bias.


def test_schedule_warms_up_then_decays_to_min_lr():
  cfg = load_config("shakespeare_char")
  sched = optim.make_schedule(cfg.optim, cfg.train.steps)
  assert float(sched(0)) == 0.0
  assert math.isclose(float(sched(100)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(sched(2000)), 1e-4, rel_tol=1e-6)
  assert float(sched(1000)) < 1e-3


# --- Schedules: linear, constant, wsd ------------------------------------------------------------

def sched_values(total=100, **overrides):
  cfg = opt_config(lr=1e-3, min_lr=1e-4, warmup_steps=10, **overrides)
  sched = optim.make_schedule(cfg, total)
  return lambda step: float(sched(step))


def test_linear_and_constant_schedules_equal_their_formulas():
  linear = sched_values(schedule="linear")
  constant = sched_values(schedule="constant")
  for step in (0, 5, 10, 30, 55, 99, 100, 150):
    warm = 1e-3 * step / 10
    lin = 1e-3 + (1e-4 - 1e-3) * min(step - 10, 90) / 90 if step >= 10 else warm
    assert math.isclose(linear(step), lin, rel_tol=1e-5, abs_tol=1e-12), step
    assert math.isclose(constant(step), warm if step < 10 else 1e-3, rel_tol=1e-6), step


WSD_SHAPES = {"linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
              "sqrt": lambda p: 1 - math.sqrt(p)}


@pytest.mark.parametrize("shape", optim.DECAY_SHAPES)
def test_wsd_warms_up_holds_lr_then_decays_over_the_last_fraction(shape):
  """100 steps, warmup 10, decay_fraction 0.2: lr on [10, 80], then the shape down to min_lr."""
  wsd = sched_values(schedule="wsd", decay_fraction=0.2, decay_shape=shape)
  assert wsd(0) == 0.0 and math.isclose(wsd(5), 5e-4, rel_tol=1e-6)
  for step in (10, 11, 40, 79, 80):  # Stable, up to and including the decay's start.
    assert math.isclose(wsd(step), 1e-3, rel_tol=1e-6), step
  for step in (85, 90, 95, 99):
    want = 1e-4 + (1e-3 - 1e-4) * WSD_SHAPES[shape]((step - 80) / 20)
    assert math.isclose(wsd(step), want, rel_tol=1e-5), step
  assert math.isclose(wsd(100), 1e-4, rel_tol=1e-5) and math.isclose(wsd(500), 1e-4, rel_tol=1e-5)
  # Halfway through the decay: linear and cosine are at the midpoint, 1 - sqrt is lower.
  mid = {"linear": 5.5e-4, "cosine": 5.5e-4, "sqrt": 1e-4 + 9e-4 * (1 - math.sqrt(0.5))}[shape]
  assert math.isclose(wsd(90), mid, rel_tol=1e-5)


def test_wsd_decay_fraction_edges():
  never = sched_values(schedule="wsd", decay_fraction=0.0)
  assert all(math.isclose(never(s), 1e-3, rel_tol=1e-6) for s in (10, 50, 99))
  # All of it: the decay takes every step after warmup (it never eats into the warmup).
  whole = sched_values(schedule="wsd", decay_fraction=1.0, decay_shape="linear")
  linear = sched_values(schedule="linear")
  for step in (0, 5, 10, 40, 99, 100):
    assert math.isclose(whole(step), linear(step), rel_tol=1e-5, abs_tol=1e-12), step


def test_schedule_free_takes_warmup_then_constant_whatever_the_schedule():
  cfg = opt_config(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
  lr = optim.lr_at(cfg, 100, "schedule_free_adamw", 0.5, np.arange(100))
  # optax's schedule_free counts from 1: update s runs at schedule(s + 1).
  np.testing.assert_allclose(lr, 0.5 * np.minimum(np.arange(1, 101) / 10, 1.0) * 1e-3, rtol=1e-6)
  adamw = optim.lr_at(cfg, 100, "adamw", 2.0, np.arange(100))
  sched = optim.make_schedule(cfg, 100)
  np.testing.assert_allclose(adamw, [2 * float(sched(s)) for s in range(100)], rtol=1e-6)


# --- The new optimizers are optax's ---------------------------------------------------------------

def test_schedule_free_adamw_is_optax_schedule_free_adamw_plus_the_decay_mask():
  params, loss, mask = quadratic_problem(seed=4)
  cfg = opt_config(lr=0.05, b1=0.9, b2=0.99, eps=1e-8)
  sched = optax.warmup_constant_schedule(0.0, 0.05, 3)
  # Decay on every tensor: exactly optax's schedule_free_adamw.
  ours = optim._optimizer("schedule_free_adamw", cfg, sched, 0.1, None)
  ref = optax.contrib.schedule_free_adamw(sched, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
  for g, w in zip(run(ours, params, loss, 6), run(ref, params, loss, 6), strict=True):
    jax.tree.map(np.testing.assert_array_equal, g, w)
  # With the mask, biases and scales follow the same rule without decay.
  no_decay = optax.contrib.schedule_free_adamw(sched, b1=0.9, b2=0.99, eps=1e-8)
  masked = run(optim._optimizer("schedule_free_adamw", cfg, sched, 0.1, mask), params, loss, 6)
  undecayed = run(no_decay, params, loss, 6)
  np.testing.assert_array_equal(masked[-1]["dense"]["bias"], undecayed[-1]["dense"]["bias"])
  assert not np.array_equal(masked[-1]["dense"]["kernel"], undecayed[-1]["dense"]["kernel"])


def test_muon_group_is_optax_muon_on_matrices():
  """A muon group on 2-D kernels is optax.contrib.muon with its default 2-D dimension rule."""
  rng = np.random.default_rng(5)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}}
  target = jax.tree.map(lambda x: x + 1.0, params)
  loss = lambda p: sum(jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p),
                                                              jax.tree.leaves(target), strict=True))
  cfg = opt_config(name="muon", lr=0.02, min_lr=0.02, warmup_steps=0, grad_clip=0.0,
                   weight_decay=0.1)
  ours = optim.make_optimizer(cfg, 10, params)
  sched = optim.make_schedule(cfg, 10)
  ref = optax.contrib.muon(sched, beta=cfg.muon_beta, weight_decay=0.1,
                           weight_decay_mask=optim.decay_mask, consistent_rms=cfg.muon_rms)
  for g, w in zip(run(ours, params, loss, 4), run(ref, params, loss, 4), strict=True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g, w)


def test_muon_dimension_numbers_follow_the_logical_axes():
  dims = lambda shape, names: tuple(optim.muon_dimension_numbers(optim.Param("x", shape, names)))
  E, L = "embed", "layers"
  assert dims((32, 4, 8), (E, "heads", "head_dim")) == ((0,), (1, 2))  # query: D -> H x K.
  assert dims((4, 8, 32), ("heads", "head_dim", E)) == ((0, 1), (2,))  # out: H x K -> D.
  assert dims((32, 2, 4, 8), (E, None, "kv_heads", "head_dim")) == ((0,), (2, 3))  # k, v apart.
  assert dims((2, 128, 32), (L, "mlp", E)) == ((1,), (2,))  # scan_layers: one matrix per layer.
  assert dims((16, 32), (None, E)) == ((0,), (1,))  # An unnamed axis of a 2-D table stays.
  assert dims((6, 4, 2), None) == ((0,), (1, 2))  # No names: DenseGeneral's layout.


@pytest.mark.parametrize("name", ["adafactor", "schedule_free_adamw"])
def test_new_optimizers_lower_the_quadratic_loss(name):
  cfg = opt_config(name=name, lr=0.05, min_lr=0.05, warmup_steps=2, grad_clip=0.0)
  params, loss, _ = quadratic_problem(seed=6)
  trajectory = run(optim.make_optimizer(cfg, 30), params, loss, 30)
  assert float(loss(trajectory[-1])) < 0.7 * float(loss(params))
