"""The pure train step: purity, dropout generators, gradient accumulation, K steps per call."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import optim
from jaxlm import step as step_lib


def tiny_state(cfg, vocab_size=65):
  model = model_lib.make_model(config_lib.model_config(cfg, vocab_size))
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = nn.unbox(step_lib.init_boxed_state(jax.random.key(0), model=model, tx=tx))
  return model, tx, state


def random_batch(batch_size, length, vocab=65, seed=0):
  tokens = np.random.default_rng(seed).integers(0, vocab, size=(batch_size, length + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def test_train_step_is_pure_and_lowers_loss():
  cfg = load_config("smoke")
  model, tx, state = tiny_state(cfg)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  batch = random_batch(8, 16)
  rng = jax.random.key(1)
  s1, m1 = step(state, batch, rng)
  s1b, m1b = step(state, batch, rng)  # Same inputs, same outputs: nothing hidden is carried.
  assert int(s1.step) == 1 and float(m1["loss"]) == float(m1b["loss"])
  jax.tree.map(np.testing.assert_array_equal, s1.params, s1b.params)
  s = s1
  for _ in range(30):
    s, m = step(s, batch, rng)
  assert float(m["loss"]) < float(m1["loss"]) - 0.5


@pytest.mark.parametrize("dropout_rng", ["rbg", "unsafe_rbg", "hash"])
def test_faster_dropout_rngs_only_change_the_masks(dropout_rng):
  """rbg and hash draw other masks than threefry (deterministically); without dropout, nothing
  moves."""
  cfg = load_config("smoke")
  batch = random_batch(8, 16)

  def loss_after_one_step(dropout, impl):
    cfg.model.dropout, cfg.train.dropout_rng = dropout, impl
    model, tx, state = tiny_state(cfg)
    _, rng = step_lib.init_rngs(cfg.seed, impl)
    step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
    return float(step(state, batch, rng)[1]["loss"])

  fast = loss_after_one_step(0.2, dropout_rng)
  assert fast == loss_after_one_step(0.2, dropout_rng)  # Deterministic.
  exact = loss_after_one_step(0.2, "threefry2x32")
  assert fast != exact and abs(fast - exact) < 0.2  # Other masks, same distribution of loss.
  assert loss_after_one_step(0.0, dropout_rng) == loss_after_one_step(0.0, "threefry2x32")


def test_gradient_accumulation_equals_one_full_batch():
  cfg = load_config("smoke")
  model, tx, state = tiny_state(cfg)
  batch = random_batch(8, 16, seed=3)
  full = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, grad_accum=1))
  accum = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, grad_accum=4))
  rng = jax.random.key(0)
  s_full, m_full = full(state, batch, rng)
  s_acc, m_acc = accum(state, batch, rng)
  # Without dropout the only difference is float summation order: tolerance 1e-5.
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s_acc.params,
               s_full.params)


def test_several_steps_per_call_equal_single_steps():
  cfg = load_config("smoke")
  model, tx, state = tiny_state(cfg)
  batches = [random_batch(8, 16, seed=s) for s in range(4)]
  rng = jax.random.key(2)
  single = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  s1, losses = state, []
  for b in batches:
    s1, m = single(s1, b, rng)
    losses.append(float(m["loss"]))
  stacked = {k: jnp.stack([b[k] for b in batches]) for k in batches[0]}
  multi = jax.jit(functools.partial(step_lib.train_steps, model=model, tx=tx))
  s4, m4 = multi(state, stacked, rng)
  assert m4["loss"].shape == (4,) and int(s4.step) == 4
  # A scan body may fuse differently from the standalone step: tolerance 1e-6 (float32).
  np.testing.assert_allclose(np.asarray(m4["loss"]), losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               s4.params, s1.params)
