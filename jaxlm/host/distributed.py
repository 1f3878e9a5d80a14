"""Multi-host setup: `jax.distributed.initialize` from the `distributed` config section."""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from jaxlm.errors import JaxlmError


def wants_auto_init() -> bool:
  """True on a multi-host TPU VM slice (or when a launcher asks): JAX finds its peers itself."""
  if os.environ.get("JAXLM_DISTRIBUTED") == "1":
    return True
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(hosts) > 1


def initialize(dist: ml_collections.ConfigDict) -> bool:
  """Joins the cluster described by `dist` (or auto-detected); False when single-process.

  Must run before anything touches a JAX device.
  """
  kwargs = dict(initialization_timeout=int(dist.init_timeout),
                heartbeat_timeout_seconds=int(dist.heartbeat_timeout))
  if dist.coordinator_address:
    if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
      raise JaxlmError(
          f"distributed.coordinator_address={dist.coordinator_address!r} needs "
          f"distributed.num_processes >= 1 and 0 <= distributed.process_id < num_processes "
          f"(got {dist.num_processes} and {dist.process_id})")
    kwargs.update(coordinator_address=dist.coordinator_address,
                  num_processes=int(dist.num_processes), process_id=int(dist.process_id))
  elif not wants_auto_init():
    return False
  where = dist.coordinator_address or "auto-detected coordinator"
  logging.info("joining %s (timeout %ds)", where, dist.init_timeout)
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise JaxlmError(f"could not join the cluster at {where} within "
                     f"distributed.init_timeout={dist.init_timeout}s: {first}") from None
  logging.info("process %d of %d: %d local device(s) of %d (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices()[0].device_kind)
  return True
