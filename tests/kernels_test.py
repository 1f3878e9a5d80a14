"""Kernels: Linear against flax's DenseGeneral, hash dropout masks and their gradients."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import kernels


@pytest.mark.parametrize("x_shape, features, in_dims", [
    ((4, 8, 12), (3, 5), 1),  # [B, L, D] -> [B, L, H, K]: the query projection.
    ((4, 8, 3, 5), (12,), 2),  # [B, L, H, K] -> [B, L, D]: the output projection.
    ((2, 4, 8, 12), (2, 3, 5), 1)])  # More leading dims; the key-value projection.
def test_linear_matches_flax_dense_general(x_shape, features, in_dims):
  """Linear: flax's parameters (same init), outputs and gradients to float32 rounding."""
  init = dict(kernel_init=nn.initializers.normal(0.5), bias_init=nn.initializers.normal(0.5))
  ours = kernels.Linear(features, in_dims=in_dims, **init)
  ref = nn.DenseGeneral(features, axis=tuple(range(-in_dims, 0)), **init)
  x = jax.random.normal(jax.random.key(0), x_shape)
  params = ours.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.key(2), x_shape[:-in_dims] + features)
  grads = [jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * g), argnums=(0, 1))(params, x)
           for m in (ours, ref)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)


def test_hash_dropout_masks_are_uniform_and_independent():
  """hash_bits against what iid uniform bits would give, at 5 standard errors."""
  shape = (8, 4, 128, 256)  # 1M elements: [B, H, L, S] like attention probabilities.
  n = math.prod(shape)
  bits = np.asarray(kernels.hash_bits(jax.random.key(0), shape))
  other = np.asarray(kernels.hash_bits(jax.random.key(1), shape))
  assert np.array_equal(bits, np.asarray(kernels.hash_bits(jax.random.key(0), shape)))
  # Every one of the 32 bits is set half the time.
  ones = np.stack([(bits >> i) & 1 for i in range(32)]).reshape(32, -1).mean(axis=1)
  np.testing.assert_allclose(ones, 0.5, atol=5 * 0.5 / math.sqrt(n))
  # Keep masks at rate 0.2: the rate, and no correlation with the neighbour along any axis,
  # with the same position under another key, or between two rows of one head.
  threshold = np.uint32(round(0.2 * 2**32))
  keep, keep2 = (bits >= threshold).astype(np.float64), (other >= threshold).astype(np.float64)
  assert abs(keep.mean() - 0.8) < 5 * math.sqrt(0.16 / n)

  def corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))

  for axis in range(4):
    lo = np.take(keep, range(shape[axis] - 1), axis=axis)
    hi = np.take(keep, range(1, shape[axis]), axis=axis)
    assert abs(corr(lo, hi)) < 5 / math.sqrt(lo.size), axis
  assert abs(corr(keep, keep2)) < 5 / math.sqrt(n)
  rows = keep.reshape(-1, shape[-1])
  assert abs(corr(rows[:-7], rows[7:])) < 5 / math.sqrt(rows[7:].size)


def test_hash_dropout_scales_kept_values_and_backprops_the_mask():
  x = jnp.linspace(1.0, 2.0, 4096).reshape(4, 1024)
  drop = kernels.HashDropout(0.25)
  y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0.70 < kept.mean() < 0.80
  g = jax.grad(lambda x: drop.apply({}, x, deterministic=False,
                                    rngs={"dropout": jax.random.key(3)}).sum())(x)
  np.testing.assert_allclose(np.asarray(g), kept / 0.75, rtol=1e-6)
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
