"""Running trials: N `jaxlm train` subprocesses at a time, with locks, signals and progress.

`run_pool` is the loop that grid sweeps and adaptive searches share: they say which trial runs
next and what happens when one ends; it starts, watches and stops the processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

from jaxlm.errors import JaxlmError
from jaxlm.sweep.plan import Sweep, TrialSpec, train_command
from jaxlm.sweep.report import summarize
from jaxlm.sweep.state import (
  LOG_FILE,
  METRIC,
  MetricsTail,
  error_line,
  failed_state,
  read_state,
  trial_identity,
  write_state,
)

_POLL_SEC = 0.5
_PROGRESS_EVERY_SEC = 60.0
_LOG_HEADER = "=== jaxlm sweep: attempt "


def try_lock(path: str) -> int | None:
  """An exclusive lock on `path` (an open fd), or None if another process holds it."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  return fd


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
  """Holds a blocking exclusive lock on `path` (no-op for None)."""
  if path is None:
    yield
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _parent_death_signal() -> Callable[[], None] | None:
  """Linux: a child setup that sends the trial SIGTERM if the sweep dies (even by SIGKILL)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  pr_set_pdeathsig = 1
  return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM))


# ---------------------------------------------------------------------------------------------
# One trial's process.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Running:
  """A trial being trained in a subprocess."""
  spec: TrialSpec
  trial_dir: str
  proc: subprocess.Popen
  lock_fd: int
  log_offset: int
  tail: MetricsTail
  state: dict[str, Any]
  started: float
  signalled: bool = False  # The sweep is stopping and asked it to stop too.
  prune: bool = False  # The pruner asked it to stop.
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # This attempt's.
  last: dict[str, Any] = dataclasses.field(default_factory=dict)  # Latest value of each key.
  last_val: tuple[int, float] | None = None  # (step, val loss) of the latest evaluation.
  optuna_trial: Any = None
  reported: set[int] = dataclasses.field(default_factory=set)

  def read_metrics(self) -> list[dict[str, Any]]:
    """The records the trial appended since the last call."""
    new = self.tail.read()
    self.records.extend(new)
    for record in new:
      self.last.update(record)
      if isinstance(record.get(METRIC), (int, float)):
        self.last_val = (record["step"], record[METRIC])
    return new


def start_trial(sweep: Sweep, spec: TrialSpec, trial_dir: str, lock_fd: int,
                extra_state: dict[str, Any] | None = None) -> Running:
  """Launches `jaxlm train` for one trial (resuming its checkpoints, if any)."""
  os.makedirs(trial_dir, exist_ok=True)
  previous = read_state(trial_dir) or {}
  command = train_command(sweep, trial_dir, spec.overrides)
  state = {**previous, **(extra_state or {}), **trial_identity(sweep, spec),
           "status": "running", "error": None,
           "attempts": previous.get("attempts", 0) + 1, "command": command,
           "host": socket.gethostname(), "sweep_pid": os.getpid(), "started_at": time.time()}
  write_state(trial_dir, state)
  log_path = os.path.join(trial_dir, LOG_FILE)
  with open(log_path, "a", encoding="utf-8") as log:
    log_offset = log.tell()
    log.write(f"{_LOG_HEADER}{state['attempts']}: {shlex.join(command)}\n")
    log.flush()
    # A session of its own: Ctrl-C in the terminal reaches only the sweep, which forwards
    # SIGTERM so that every trial saves a checkpoint. The lock fd is inherited, so the trial
    # directory stays locked until the trial itself has exited.
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            pass_fds=(lock_fd,), preexec_fn=_parent_death_signal())
  resumed = "resuming" if os.path.isdir(os.path.join(trial_dir, "checkpoints")) else "starting"
  logging.info("trial %s: %s (attempt %d) | log %s", spec.name, resumed, state["attempts"],
               log_path)
  return Running(spec=spec, trial_dir=trial_dir, proc=proc, lock_fd=lock_fd,
                 log_offset=log_offset, tail=MetricsTail(trial_dir), state=state,
                 started=time.time())


def finish_trial(r: Running) -> dict[str, Any]:
  """Records how a trial ended: done, interrupted, pruned or failed (with its error)."""
  rc = r.proc.wait()
  r.read_metrics()
  ends = [rec["step"] for rec in r.records if "wall_time_sec" in rec]
  reached = bool(ends) and (ends[-1] >= r.spec.steps or ends[-1] == r.spec.stop_at)
  if rc == 0 and reached:
    status = "done"
  elif r.prune:
    status = "pruned"
  elif rc == 0 or r.signalled:
    status = "interrupted"  # Stopped by us or by someone's SIGTERM: resumable.
  else:
    status = "failed"
  ended = {"returncode": rc, "finished_at": time.time()}
  if status == "failed":
    error = error_line(os.path.join(r.trial_dir, LOG_FILE), r.log_offset)
    state = failed_state(r.state, error, **ended)
  else:
    state = {**r.state, "status": status, "error": None, **ended}
  write_state(r.trial_dir, state)
  os.close(r.lock_fd)
  val = r.last.get(METRIC)
  took = time.time() - r.started
  if status == "failed":
    logging.warning("trial %s: failed after %.0fs: %s", r.spec.name, took, state["error"])
  else:
    logging.info("trial %s: %s at step %s after %.0fs%s", r.spec.name, status,
                 r.last.get("step", 0), took,
                 f" | val loss {val:.4f}" if isinstance(val, float) else "")
  return state


def send_signal(r: Running, sig: signal.Signals) -> None:
  with contextlib.suppress(ProcessLookupError):
    r.proc.send_signal(sig)


# ---------------------------------------------------------------------------------------------
# The pool: N trials at a time until none is left or the sweep is stopped.
# ---------------------------------------------------------------------------------------------

class _Interrupts:
  """Counts SIGINT/SIGTERM: the first stops the sweep gracefully, the second kills trials."""

  def __init__(self):
    self.count = 0
    self._previous = {sig: signal.signal(sig, self._handle)
                      for sig in (signal.SIGINT, signal.SIGTERM)}

  def _handle(self, signum, frame):
    self.count += 1
    name = signal.Signals(signum).name
    if self.count == 1:
      logging.warning("%s received: stopping the sweep; running trials get SIGTERM and save a "
                      "checkpoint (send it again to kill them)", name)
    else:
      logging.warning("%s received again: killing running trials", name)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class Progress:
  total: int
  done: int = 0
  failed: int = 0
  pruned: int = 0
  interrupted: int = 0
  best: tuple[float, str] | None = None

  def count(self, state: dict[str, Any], val: float | None) -> None:
    status = state["status"]
    if status == "done":
      self.done += 1
      # A NaN would stick as the best: nothing compares below it.
      if val is not None and math.isfinite(val) and (self.best is None or val < self.best[0]):
        self.best = (val, state["name"])
    elif status == "failed":
      self.failed += 1
    elif status == "pruned":
      self.pruned += 1
    elif status == "interrupted":
      self.interrupted += 1

  def log(self, running: list[Running]) -> None:
    best = (f" | best val loss {self.best[0]:.4f} ({self.best[1]})" if self.best
            else " | best val loss -")
    pruned = f", {self.pruned} pruned" if self.pruned else ""
    logging.info("sweep: %d/%d done, %d running, %d failed%s%s", self.done, self.total,
                 len(running), self.failed, pruned, best)


def run_pool(parallel: int, next_trial: Callable[[], Running | None],
             on_finish: Callable[[Running, dict[str, Any]], None],
             progress: Progress,
             watch: Callable[[Running, dict[str, Any]], None] | None = None) -> bool:
  """Keeps `parallel` trials running until `next_trial` has none left; True if interrupted."""
  interrupts = _Interrupts()
  running: list[Running] = []
  last_report = time.time()
  try:
    while True:
      while not interrupts.count and len(running) < parallel:
        r = next_trial()
        if r is None:
          break
        running.append(r)
        progress.log(running)
      if not running:
        break
      time.sleep(_POLL_SEC)
      for r in running:
        if interrupts.count and not r.signalled:
          r.signalled = True
          send_signal(r, signal.SIGTERM)
        if interrupts.count > 1:
          send_signal(r, signal.SIGKILL)
      for r in list(running):
        for record in r.read_metrics():
          if watch is not None:
            watch(r, record)
        if r.proc.poll() is not None:
          running.remove(r)
          state = finish_trial(r)
          on_finish(r, state)
          progress.log(running)
      if time.time() - last_report > _PROGRESS_EVERY_SEC and running:
        last_report = time.time()
        progress.log(running)
        for r in running:
          val = (f" | val loss {r.last_val[1]:.4f} at step {r.last_val[0]}"
                 if r.last_val else "")
          logging.info("  running %s: step %s/%d%s", r.spec.name, r.last.get("step", 0),
                       r.spec.steps, val)
  finally:
    interrupts.restore()
  return interrupts.count > 0


def conclude(workdir: str, interrupted: bool, progress: Progress,
             summary: bool = True) -> list[dict[str, Any]]:
  """After the pool: the results (unless `summary` is off) and how the sweep ended."""
  rows = summarize(workdir) if summary else []
  if interrupted:
    logging.warning("sweep stopped: run the same command to resume (%d/%d trials done)",
                    progress.done, progress.total)
  else:
    progress.log([])
  if progress.failed and not progress.done and not progress.pruned and not interrupted:
    raise JaxlmError(f"every trial failed; see the logs in {workdir}/*/{LOG_FILE}")
  return rows
