"""Host plumbing, apart from the model math: allocator, XLA flags, multi-process, launchers.

`prepare_process` is the one call a command makes before anything touches a device.
"""

from __future__ import annotations

import ml_collections


def prepare_process(cfg: ml_collections.ConfigDict, *, compile_cache: bool = True) -> None:
  """Allocator, XLA flags, jax.distributed and the compile cache, in the order they need.

  The allocator may restart the command with another malloc preloaded, so it goes first; the
  XLA flags and distributed init must both precede the first use of a device.
  """
  from jaxlm.host import allocator  # Imported here so `jaxlm --help` never loads jax.
  allocator.ensure(cfg.host_allocator)
  from jaxlm.host import distributed, xla
  xla.apply(cfg.xla_flags)
  distributed.initialize(cfg.distributed)
  if compile_cache:
    xla.enable_compile_cache(cfg.compile_cache)
