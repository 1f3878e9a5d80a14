"""XLA settings from the config: flags (`xla_flags`) and the persistent compilation cache.

Flags go into XLA_FLAGS before the XLA backend starts.

XLA reads XLA_FLAGS once, when the first backend is created, and aborts the process on a flag
it does not know. So the CLI applies the config's flags before anything touches a device, and
"auto" only ever means flags measured with this jaxlib (TESTED_FLAGS); other versions get none.

Why "auto" sets what it sets (the measurements are in experiments/cpu_throughput/README.md):
- `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions). jaxlib 0.10's CPU
  backend hands dots and reductions to YNNPACK. Both paths reach about the same square-matmul
  peak, but inside a transformer step YNNPACK is slower: its reductions (e.g. the softmax
  backward's row sums) and the transposed copies its dots need cost more than they save, on
  the default and the large config alike, and with either malloc. Same math: only which
  library sums the same numbers changes (tests/xla_test.py compares losses and parameters).
  MFU stays honest: the CPU peak is the best of both (jaxlm.metrics).
- `--xla_disable_hlo_passes=tree_reduction_rewriter`. On CPU this pass splits each long
  reduction into a reduce-window and a second reduce (pairwise-style sums). XLA's CPU
  reduce-window loop is slow, and a small model's step has a few hundred such reductions
  (bias and LayerNorm gradients, the softmax backward, the gradient and parameter norms), so
  without the pass the step is a few percent faster, more so when the machine is contended, and
  compiles faster. Sums then run in vectorised order without the split: float32 results differ
  in the last bits only (tests/xla_test.py), and a large config's step is unchanged.
"""

from __future__ import annotations

import os

import jax
import jaxlib
from absl import logging

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

# jaxlib "major.minor" -> the flags "auto" adds (XLA flag names change between versions).
TESTED_FLAGS = {
    "0.10": ("--xla_cpu_experimental_ynn_fusion_type=",
             "--xla_disable_hlo_passes=tree_reduction_rewriter"),
}


def resolve(value: str) -> tuple[str, ...]:
  """The flags that `xla_flags = value` stands for: "auto", "" (none) or explicit flags."""
  value = value.strip()
  if value == "auto":
    version = ".".join(jaxlib.__version__.split(".")[:2])
    return TESTED_FLAGS.get(version, ())
  flags = tuple(value.split())
  for flag in flags:
    if not flag.startswith("--xla_"):
      raise JaxlmError(f"xla_flags: {flag!r} is not an XLA flag (expected --xla_...=value, or "
                       "'auto', or '' for none)")
  return flags


def _backend_started() -> bool:
  from jax._src import xla_bridge  # Not in jax's public API; absent = assume started.
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return started() if started else True


# XLA_FLAGS as it was before `apply` added to it (None: nothing added, XLA runs as it would).
_original_flags: str | None = None


def original_env() -> dict[str, str] | None:
  """The environment without the flags `apply` added, or None if it added none."""
  if _original_flags is None:
    return None
  env = dict(os.environ)
  if _original_flags:
    env["XLA_FLAGS"] = _original_flags
  else:
    env.pop("XLA_FLAGS", None)
  return env


def apply(value: str) -> tuple[str, ...]:
  """Appends the flags of `xla_flags = value` to XLA_FLAGS; returns those it added.

  A flag the user already set in XLA_FLAGS (by name) wins over the config's. Once a backend
  has started, XLA no longer reads XLA_FLAGS: then nothing is added and a warning says so.
  """
  flags = resolve(value)
  existing = os.environ.get("XLA_FLAGS", "")
  names = {f.split("=")[0] for f in existing.split()}
  added = tuple(f for f in flags if f.split("=")[0] not in names)
  if not added:
    return ()
  if _backend_started():
    logging.warning("xla_flags %s not applied: the XLA backend (%s) has already started",
                    " ".join(added), jax.default_backend())
    return ()
  global _original_flags
  _original_flags = existing
  os.environ["XLA_FLAGS"] = " ".join([existing, *added]).strip()
  logging.info("XLA_FLAGS += %s (config xla_flags=%r)", " ".join(added), value)
  return added


def enable_compile_cache(value: str) -> str:
  """Turns on JAX's persistent compilation cache in `value` ("auto": under the user's cache
  directory; "": off); returns the directory used, or "".

  A run whose programs were compiled before (a rerun, a resumed run, the next trial of a
  sweep) loads them instead of compiling, which for small models is most of a short run's
  startup. A directory set by the user (JAX_COMPILATION_CACHE_DIR) wins.
  """
  if not value or jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir or ""
  if value == "auto":
    value = workdir_lib.cache_dir("xla")
  if "://" not in value and os.path.exists(value) and not os.path.isdir(value):
    raise JaxlmError(f"compile_cache={value!r} is a file, not a directory")
  jax.config.update("jax_compilation_cache_dir", value)
  # JAX caches only programs that took over 1 s to compile; small models' sampler prefill
  # and evaluation can be below that, and a rerun would compile them again.
  if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  return value
