"""Where a run's wall time goes: startup, data, init, peak, compile, steps, eval, sample, save.

A `Phases` clock is always in exactly one phase, so the phases partition the wall time by
construction (their sum is the wall from the clock's start, with nothing counted twice):

  phases = Phases(start=process_start())
  with phases("data"):
    ...            # counted as data, not as what was running around it
  phases.summary() # "startup <s>s <share>% | data ... | wall <s>s"

Work that runs on other threads during a phase (the eval and sample programs compiling while
the train step compiles) belongs to the phase the main thread is in. Device work is
asynchronous: the training loop waits for its steps before it enters an evaluation or a save,
so that the time of the steps is not charged to what follows them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

# In the order a run meets them; "other" is whatever no phase claimed (records, checks).
NAMES = ("startup", "data", "init", "peak", "compile", "steps", "eval", "sample", "save", "other")


# Set by host.allocator before it re-executes the process: "<pid>:<process_start()>", so the
# restarted interpreter keeps counting from the first one's start.
STARTED_ENV = "JAXLM_STARTED_AT"


def process_start() -> float:
  """Where this run's clock starts, on the time.perf_counter clock: the first import of jaxlm
  in this process, or in the interpreter it replaced when host_allocator restarted it.

  Imports (jax's among them) then belong to the run's wall; the interpreter's own start before
  the first import of jaxlm does not. The process' start time in /proc is not used: a shell
  that runs `cmd && jaxlm train` as its last command execs jaxlm in its own process, whose
  start is the shell's, so it would charge `cmd` (an install, say) to startup.
  """
  import jaxlm
  start = jaxlm.IMPORTED_AT
  pid, _, carried = os.environ.get(STARTED_ENV, "").partition(":")
  if pid == str(os.getpid()):  # A child process that inherited the variable ignores it.
    try:
      start = min(start, float(carried))
    except ValueError:
      pass
  return start


class Phases:
  """Seconds per phase of one run; `with phases(name):` charges the block to `name`."""

  def __init__(self, start: float | None = None, first: str = "startup"):
    self.start = time.perf_counter() if start is None else start
    self.seconds = dict.fromkeys(NAMES, 0.0)
    self.current, self.mark = first, self.start

  def _switch(self, name: str) -> str:
    now = time.perf_counter()
    self.seconds[self.current] += now - self.mark
    previous, self.current, self.mark = self.current, name, now
    return previous

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    if name not in self.seconds:
      raise ValueError(f"unknown phase {name!r}; one of {', '.join(NAMES)}")
    previous = self._switch(name)
    try:
      yield
    finally:
      self._switch(previous)

  def enter(self, name: str) -> None:
    """Leaves the current phase for `name` (for code that is not one block)."""
    self._switch(name)

  def totals(self) -> dict[str, float]:
    """Seconds per phase up to now (the current phase included), and "wall": their sum."""
    out = dict(self.seconds)
    out[self.current] += time.perf_counter() - self.mark
    out["wall"] = sum(out.values())
    return out

  def record(self) -> dict[str, float]:
    """The totals as metrics.jsonl keys: phase/<name>_sec, phase/wall_sec."""
    return {f"phase/{k}_sec": v for k, v in self.totals().items()}

  def summary(self) -> str:
    return format_totals(self.totals())


def format_totals(totals: dict[str, float]) -> str:
  """"<phase> <seconds>s <share of the wall>% | ... | wall <seconds>s" (phases under 0.05 s
  left out of the line)."""
  totals = dict(totals)
  wall = max(totals.pop("wall"), 1e-9)
  parts = [f"{k} {v:.1f}s {100 * v / wall:.0f}%" for k, v in totals.items() if v >= 0.05]
  return " | ".join(parts + [f"wall {wall:.1f}s"])
