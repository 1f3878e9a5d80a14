"""The host memory allocator of a run (config key `host_allocator`).

Why: XLA:CPU takes each step's temporaries from malloc and frees them when the step ends. For
shakespeare_char_large that is one block of several GB per step. glibc's malloc serves a block
that large with mmap and gives it back with munmap, so every step touches gigabytes of fresh
pages: about a million page faults per step, all in the kernel. Telling glibc to keep the
block (M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1, one arena) removes the faults but not the cost: its
best-fit search (_int_malloc) then takes as long. tcmalloc and jemalloc (without decay) keep
freed pages and hand them out again cheaply, which makes the large step markedly faster
(jaxlm bench; experiments/cpu_throughput/README.md has the numbers). The price is resident
memory: what a step freed stays mapped, so the process's peak RSS is about twice the
temporaries, not once.

A malloc can only be swapped before the process starts (LD_PRELOAD), so `ensure` re-executes
the jaxlm command once with the library preloaded; the re-executed process finds it loaded and
goes on. The math is unchanged: only where buffers live changes.

Values: "auto" (tcmalloc, else jemalloc, if the dynamic linker finds one; else the system's
malloc, silently), "system" or "" (leave malloc alone), "tcmalloc", "jemalloc" (an error if
not installed: e.g. `apt install libtcmalloc-minimal4` or `libjemalloc2`), or the path of a
malloc library. An allocator the user preloaded already is kept whatever the value.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

from absl import logging

from jaxlm import phases
from jaxlm.errors import JaxlmError

# Name -> (names the dynamic linker knows it by, environment it needs).
KNOWN = {
    "tcmalloc": (("tcmalloc_minimal", "tcmalloc"), {}),
    # jemalloc's default gives freed pages back to the OS after a few seconds, which costs as
    # much as glibc's munmap here; never decaying is what makes it fast.
    "jemalloc": (("jemalloc",), {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
}
# Set in the environment of the re-executed process: the library it was asked to preload.
_MARKER = "JAXLM_HOST_ALLOCATOR"


def _find(name: str) -> str | None:
  for lib in KNOWN[name][0]:
    found = ctypes.util.find_library(lib)
    if found:
      return found
  return None


def resolve(value: str) -> tuple[str, str] | None:
  """(name, library) that `host_allocator = value` asks for, or None for the system malloc."""
  value = value.strip()
  if value in ("", "system") or (value == "auto" and not sys.platform.startswith("linux")):
    return None
  if not sys.platform.startswith("linux"):
    raise JaxlmError(f"host_allocator={value!r} needs Linux (LD_PRELOAD); use 'auto' or 'system'")
  if value == "auto":
    for name in KNOWN:
      lib = _find(name)
      if lib:
        return name, lib
    return None
  if value in KNOWN:
    lib = _find(value)
    if not lib:
      raise JaxlmError(f"host_allocator={value!r}: lib{KNOWN[value][0][0]} is not installed "
                       "(use 'auto' or 'system', or install it)")
    return value, lib
  if "/" in value:
    if not os.path.isfile(value):
      raise JaxlmError(f"host_allocator={value!r}: no such file" if not os.path.exists(value)
                       else f"host_allocator={value!r}: not a file")
    return os.path.basename(value), os.path.abspath(value)
  raise JaxlmError(f"host_allocator={value!r}: expected auto, system, "
                   f"{', '.join(KNOWN)} or the path of a malloc library")


def loaded() -> str:
  """The path of the malloc library mapped into this process: one jaxlm preloaded, or a
  known one (tcmalloc, jemalloc, mimalloc) that the user did; "system" if none."""
  stems = [f"lib{lib}" for spec in KNOWN.values() for lib in spec[0]] + ["libmimalloc"]
  if os.environ.get(_MARKER):
    stems.insert(0, os.path.basename(os.environ[_MARKER]).split(".so")[0])
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      paths = sorted({line.split()[-1] for line in f if "/" in line})
  except OSError:  # Not Linux: nothing was preloaded by jaxlm.
    return "system"
  for stem in stems:
    for path in paths:
      if os.path.basename(path).split(".so")[0] == stem:
        return path
  return "system"


def ensure(value: str) -> None:
  """Re-executes this jaxlm command with the allocator of `value` preloaded, unless it (or
  another malloc the user preloaded) is already in the process. Returns if nothing to do."""
  choice = resolve(value)
  if choice is None or loaded() != "system":
    return
  name, lib = choice
  if os.environ.get(_MARKER):  # Re-executed already, and the library still did not load.
    logging.warning("host_allocator: %s did not load; running with the system malloc", lib)
    return
  env = dict(os.environ)
  env["LD_PRELOAD"] = " ".join([lib, env.get("LD_PRELOAD", "")]).strip()
  env[_MARKER] = lib
  # The restarted interpreter's run clock starts where this one's did (jaxlm.phases).
  env[phases.STARTED_ENV] = f"{os.getpid()}:{phases.process_start()!r}"
  for key, val in KNOWN.get(name, ((), {}))[1].items():
    env.setdefault(key, val)
  logging.info("host_allocator: restarting with %s preloaded (config host_allocator=%r)",
               lib, value)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
