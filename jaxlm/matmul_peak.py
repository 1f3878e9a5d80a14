"""The attainable matmul FLOP/s of a device, timed: the peak MFU divides by on CPUs.

A module of its own, importing jax alone, so that jaxlm.metrics' child process (the peak with
XLA's own flags) starts quickly.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp


def measure_matmul_flops(device: jax.Device, dtype: str = "float32", n: int = 1024,
                         reps: int = 20) -> float:
  """Best-of-`reps` FLOP/s of an n×n×n matmul on `device`: the attainable peak there."""
  x = jax.device_put(jnp.ones((n, n), dtype=dtype), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best
