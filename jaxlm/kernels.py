"""CPU-speed kernels: flax's Dense and Dropout, with the same math, laid out for XLA:CPU.

jaxlm/model.py builds its projections from `Linear` and, with train.dropout_rng = "hash", its
dropout from `HashDropout`. Each computes what its flax counterpart computes (Linear: the same
parameter names, shapes and initial values as nn.Dense / nn.DenseGeneral, outputs and gradients
equal to float32 rounding; HashDropout: nn.Dropout's inverted dropout with another source of
mask bits), but hands XLA:CPU a form it compiles into less memory traffic:

- Linear flattens the leading dims of x (batch, length) into one row dim, so every weight
  gradient is a plain matrix product contracting one dim; XLA:CPU then calls its GEMM with a
  transpose flag instead of first copying an operand into transposed order in memory.
- Its bias gradient is a matrix-vector product, ones @ g, which reads g once; XLA:CPU splits a
  column sum over many rows into windows of 32 rows and passes over g several times.
- HashDropout's keep mask is a hash of (key, row, column), a pure elementwise function of an
  iota that XLA fuses into the op using the mask. A jax.random mask is an RNG kernel writing
  4 bytes per element and a select reading them back.

Other backends run the same code; the layouts are chosen for XLA:CPU. What each change saved,
measured, is in experiments/cpu_throughput/README.md.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@jax.custom_vjp
def _add_bias(y_NxF: jax.Array, bias_F: jax.Array) -> jax.Array:
  """y + bias, whose bias gradient is a matrix-vector product (ones @ g) instead of a sum."""
  return y_NxF + bias_F[None]


def _add_bias_fwd(y_NxF, bias_F):
  return _add_bias(y_NxF, bias_F), None


def _add_bias_bwd(_, g_NxF):
  # XLA:CPU splits a long reduction into windows of 32 rows, in several passes over g; the
  # matvec reads g once.
  ones_N = jnp.ones(g_NxF.shape[:1], g_NxF.dtype)
  grad = jax.lax.dot_general(ones_N, g_NxF, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
  return g_NxF, grad.astype(g_NxF.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Linear(nn.Module):
  """y = x @ kernel + bias over the last `in_dims` dims of x: flax's nn.Dense / DenseGeneral
  (the same parameter names, shapes and initial values), computed on rows.

  x's leading dims (batch, length) are flattened into one row dim N first. With [B, L] kept as
  two dims, every weight gradient contracted over two dims and XLA:CPU transposed an operand
  in memory to do it (a [B·L, F] copy for the MLP); over one dim it calls the matmul with a
  transpose flag instead. The kernel keeps its shape (e.g. [D, H, K]), so a sharded head axis
  stays sharded.
  """
  features: tuple[int, ...]
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  in_dims: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lead, in_shape = x.shape[:x.ndim - self.in_dims], x.shape[x.ndim - self.in_dims:]
    fan_in, fan_out = math.prod(in_shape), math.prod(self.features)

    def flat_init(init, flat_shape, shape):
      # As flax: initialise the [fan_in, fan_out] matrix (or the flat bias), then reshape.
      def init_fn(rng, _, dtype):
        value = init(rng, flat_shape, dtype)
        if isinstance(value, nn.meta.AxisMetadata):
          return nn.meta.replace_boxed(value, value.unbox().reshape(shape))
        return value.reshape(shape)
      return init_fn

    kernel_shape = in_shape + self.features
    kernel = self.param("kernel", flat_init(self.kernel_init, (fan_in, fan_out), kernel_shape),
                        kernel_shape, self.param_dtype)
    x_NxI = x.reshape(-1, *in_shape).astype(self.dtype)
    contract = (tuple(range(1, 1 + self.in_dims)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x_NxI, kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", flat_init(self.bias_init, (fan_out,), self.features),
                        self.features, self.param_dtype)
      y = _add_bias(y, bias.astype(self.dtype))
    return y.reshape(*lead, *self.features)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit flips
  each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits for every element of `shape`: a hash of (key, row, column), no stored state.

  Row = flat index over all but the last dimension, column = index in the last one. Each is
  mixed with its own 32 key bits by a bijection (so two rows, or two columns, never share
  their mixed value), the two are combined and mixed again. Unlike jax.random.bits, the bits
  are a pure elementwise function of an iota, so XLA fuses them into the op that uses the
  mask and never writes them to memory. Rows wrap past 2**32 (arrays of >= 2**32 rows).
  """
  k_row, k_col = jax.random.bits(key, (2,), jnp.uint32)
  row = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in range(len(shape) - 2, -1, -1):
    row = row + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
    stride *= shape[dim]
  col = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
  return _fmix32(_fmix32(row ^ k_row) ^ _fmix32(col ^ k_col))


class HashDropout(nn.Module):
  """Inverted dropout (as nn.Dropout) whose keep mask is `hash_bits(key) >= rate * 2**32`.

  On CPU, masks from jax.random are an RNG kernel that writes 4 bytes per element and a
  select that reads them back: for attention probabilities, B·H·L·S elements a layer. The hash
  is ~25 integer ops per element inside the fusion that uses the mask (the softmax, for the
  attention probabilities). The drop probability is exact to 2**-32; the masks differ from
  jax.random's (tests/kernels_test.py checks their rate and independence).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    threshold = jnp.uint32(min(round(self.rate * 2**32), 2**32 - 1))
    keep = hash_bits(self.make_rng("dropout"), x.shape) >= threshold
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
