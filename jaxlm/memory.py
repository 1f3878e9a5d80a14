"""How much memory is free for a new allocation: the host's, and the accelerator's if it says.

Used to refuse a request that would otherwise grow until the kernel's OOM killer ends the
process (no message, no traceback) or the accelerator fails mid-run.
"""

from __future__ import annotations

import os

import jax


def host_available_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), else free physical pages; 0 when unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 0


def device_available_bytes() -> int:
  """The first local accelerator's free memory; 0 when it does not report it (CPUs)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001  (backends without memory stats raise various errors)
    return 0
  limit = stats.get("bytes_limit", 0)
  return max(limit - stats.get("bytes_in_use", 0), 0) if limit else 0


def available_bytes() -> int:
  """The smaller of host and device free memory that are known; 0 when neither is."""
  known = [b for b in (host_available_bytes(), device_available_bytes()) if b]
  return min(known) if known else 0
