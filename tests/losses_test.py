"""Losses: cross-entropy, the loss mask and z-loss against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses


def random_problem(batch=3, length=5, vocab=11, scale=3.0, seed=0):
  """Random logits (far from uniform, so errors show) and integer targets."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((batch, length, vocab))).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  return logits, targets


def np_logsumexp(logits):
  x = np.asarray(logits, np.float64)
  top = x.max(axis=-1, keepdims=True)
  return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def np_token_ce(logits, targets):
  """Per-position -log softmax(logits)[target] in float64."""
  x = np.asarray(logits, np.float64)
  log_probs = x - np_logsumexp(x)[..., None]
  return -np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("use_jit", [False, True])
def test_cross_entropy_equals_numpy_log_softmax(use_jit):
  logits, targets = random_problem()
  fn = jax.jit(losses.cross_entropy) if use_jit else losses.cross_entropy
  total, aux = fn(jnp.asarray(logits), jnp.asarray(targets))
  expected = np_token_ce(logits, targets).mean()
  np.testing.assert_allclose(float(aux["loss"]), expected, rtol=1e-6)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)  # No z-loss: total == ce.


def test_cross_entropy_of_uniform_logits_is_log_vocab():
  targets = np.random.default_rng(1).integers(0, 64, size=(2, 7)).astype(np.int32)
  total, _ = losses.cross_entropy(jnp.zeros((2, 7, 64)), jnp.asarray(targets))
  np.testing.assert_allclose(float(total), np.log(64), rtol=1e-6)


def test_aux_keys_dtypes_and_unmasked_token_count():
  logits, targets = random_problem(batch=4, length=6)
  total, aux = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert set(aux) == {"loss", "tokens"}
  for x in (total, aux["loss"], aux["tokens"]):
    assert x.shape == () and x.dtype == jnp.float32
  assert float(aux["tokens"]) == 4 * 6


def test_mask_excludes_zeros_from_mean_and_count():
  logits, targets = random_problem(batch=3, length=5)
  mask = np.ones((3, 5), np.float32)
  mask[0, :2] = 0
  mask[2, 4] = 0
  total, aux = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                    jnp.asarray(mask))
  ce = np_token_ce(logits, targets)
  expected = ce[mask == 1].mean()
  np.testing.assert_allclose(float(aux["loss"]), expected, rtol=1e-6)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  assert float(aux["tokens"]) == mask.sum() == 12
  assert abs(expected - ce.mean()) > 1e-3  # The mask changes the answer: the test can fail.

  # Masked positions do not matter at all: any logits or targets there give the same loss.
  changed_logits, changed_targets = logits.copy(), targets.copy()
  changed_logits[mask == 0] = 50.0 * np.random.default_rng(7).standard_normal(
      (int((mask == 0).sum()), logits.shape[-1]))
  changed_targets[mask == 0] = (changed_targets[mask == 0] + 1) % logits.shape[-1]
  total2, _ = losses.cross_entropy(jnp.asarray(changed_logits), jnp.asarray(changed_targets),
                                   jnp.asarray(mask))
  np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)


def test_boolean_mask_equals_float_mask():
  logits, targets = random_problem()
  mask = np.random.default_rng(3).random((3, 5)) > 0.4
  as_bool, aux_b = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                        jnp.asarray(mask))
  as_float, aux_f = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                         jnp.asarray(mask, jnp.float32))
  assert float(as_bool) == float(as_float) and float(aux_b["tokens"]) == mask.sum()


def test_fractional_mask_is_a_weighted_mean():
  """The code multiplies each token's loss by its mask value and divides by the mask's sum."""
  logits, targets = random_problem(batch=2, length=6)
  weights = np.random.default_rng(4).uniform(0.1, 3.0, size=(2, 6)).astype(np.float32)
  weights[1, 0] = 0.0
  total, aux = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                    jnp.asarray(weights))
  ce = np_token_ce(logits, targets)
  expected = (ce * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  np.testing.assert_allclose(float(aux["tokens"]), weights.sum(), rtol=1e-6)  # Not a count.
  assert abs(expected - ce[weights > 0].mean()) > 1e-3


def test_all_masked_batch_gives_zero_loss_not_nan():
  logits, targets = random_problem()
  total, aux = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                    jnp.zeros((3, 5)))
  assert float(total) == 0.0 and float(aux["loss"]) == 0.0 and float(aux["tokens"]) == 0.0


def test_gradient_is_softmax_minus_one_hot_over_token_count():
  logits, targets = random_problem(batch=2, length=4, vocab=7)
  mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], np.float32)
  grad = jax.grad(lambda x: losses.cross_entropy(x, jnp.asarray(targets),
                                                 jnp.asarray(mask))[0])(jnp.asarray(logits))
  x = np.asarray(logits, np.float64)
  probs = np.exp(x - np_logsumexp(x)[..., None])
  one_hot = np.eye(7)[targets]
  expected = (probs - one_hot) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("z_loss", [1e-4, 0.1])
def test_z_loss_adds_coefficient_times_masked_mean_of_squared_log_z(z_loss):
  logits, targets = random_problem(scale=5.0)
  logits = logits + 4.0  # Shift log Z well away from 0 so the z-loss term is large.
  mask = np.ones((3, 5), np.float32)
  mask[1, 1:4] = 0
  args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  total, aux = losses.cross_entropy(*args, z_loss=z_loss)
  ce = (np_token_ce(logits, targets) * mask).sum() / mask.sum()
  log_z = np_logsumexp(logits)
  z_term = z_loss * (log_z**2 * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(aux["loss"]), ce, rtol=1e-6)  # aux["loss"] is CE alone.
  np.testing.assert_allclose(float(total), ce + z_term, rtol=1e-6)
  np.testing.assert_allclose(float(total) - float(aux["loss"]), z_term, rtol=1e-4)
  # Without z-loss the total is the cross-entropy: the term above really comes from z_loss.
  assert float(losses.cross_entropy(*args)[0]) == float(aux["loss"])


def test_z_loss_gradient_pushes_log_z_towards_zero():
  logits, targets = random_problem()
  logits = jnp.asarray(logits + 10.0)
  loss = lambda x: losses.cross_entropy(x, jnp.asarray(targets), z_loss=1e-2)[0]
  grad = jax.grad(loss)(logits)
  # d/dx of z * mean(logZ^2) sums to 2 z logZ / n per position (CE's gradient sums to 0).
  log_z = np_logsumexp(np.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad).sum(-1), 2e-2 * log_z / log_z.size, rtol=1e-4)


def test_bfloat16_logits_are_upcast_and_reduced_in_float32():
  logits, targets = random_problem(batch=4, length=8, vocab=1000, scale=4.0, seed=5)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  total, aux = losses.cross_entropy(logits_bf16, jnp.asarray(targets), z_loss=1e-3)
  assert total.dtype == aux["loss"].dtype == aux["tokens"].dtype == jnp.float32
  exact = np.asarray(logits_bf16.astype(jnp.float32), np.float64)  # The bf16 values, exactly.
  ce = np_token_ce(exact, targets).mean()
  expected = ce + 1e-3 * (np_logsumexp(exact) ** 2).mean()
  np.testing.assert_allclose(float(aux["loss"]), ce, rtol=2e-6)
  np.testing.assert_allclose(float(total), expected, rtol=2e-6)
  # The same math in bfloat16 misses by far more than that tolerance: the check can fail.
  log_z_bf16 = jax.nn.logsumexp(logits_bf16, axis=-1)
  picked = jnp.take_along_axis(logits_bf16, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
  ce_bf16 = float(jnp.mean(log_z_bf16 - picked))
  assert abs(ce_bf16 - ce) / ce > 1e-4
