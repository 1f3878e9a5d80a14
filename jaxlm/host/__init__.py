"""Host plumbing, apart from the model math: allocator, XLA flags, multi-process, launchers.

`prepare_process` is the one call a command makes before anything touches a device.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import ml_collections

# A jax plugin (or libtpu) that is installed, and a device file it would open: an accelerator
# backend will start. Checked without starting any backend, since XLA's flags and the malloc
# must be settled first.
_ACCELERATORS = (("gpu", ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"),
                  ("/dev/nvidia[0-9]*", "/dev/kfd")),
                 ("tpu", ("libtpu",), ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")))


def accelerator_expected() -> str | None:
  """"gpu" or "tpu" when this process' jax will run on one, else None (a CPU run)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  for name, modules, device_files in _ACCELERATORS:
    if platforms and not any(p.startswith(("cuda", "rocm", "gpu", "tpu")) for p in
                             platforms.split(",")):
      return None
    if (any(importlib.util.find_spec(m) for m in modules)
        and any(glob.glob(pattern) for pattern in device_files)):
      return name
  return None


def prepare_process(cfg: ml_collections.ConfigDict, *, compile_cache: bool = True) -> None:
  """Allocator, XLA flags, jax.distributed and the compile cache, in the order they need.

  The allocator may restart the command with another malloc preloaded, so it goes first; the
  XLA flags and distributed init must both precede the first use of a device.
  """
  from jaxlm.host import allocator  # Imported here so `jaxlm --help` never loads jax.
  accelerator = accelerator_expected()
  # "auto"'s malloc restart and XLA flags were measured on CPUs (their modules say why); on an
  # accelerator the host only feeds the device, so auto leaves both alone. Explicit values apply.
  skipped = [k for k in ("host_allocator", "xla_flags") if accelerator and cfg[k] == "auto"]
  if skipped:
    from absl import logging
    logging.info("host: %s=auto skipped (CPU-only tweaks; this machine has a %s)",
                 "=auto and ".join(skipped), accelerator)
  if "host_allocator" not in skipped:
    allocator.ensure(cfg.host_allocator)
  from jaxlm.host import distributed, xla
  if "xla_flags" not in skipped:
    xla.apply(cfg.xla_flags)
  distributed.initialize(cfg.distributed)
  if compile_cache:
    xla.enable_compile_cache(cfg.compile_cache)
