"""Running a sweep: `run` runs (or resumes) a grid sweep's trials, or hands a search to Optuna.

A grid sweep runs each of its checked trials once: finished ones are skipped, interrupted ones
resume from their checkpoints and failed ones are tried again, except those whose values
validate_config rejects, which are recorded as failed without running.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError
from jaxlm.sweep.plan import Sweep
from jaxlm.sweep.pool import Progress, Running, conclude, run_pool, start_trial, try_lock
from jaxlm.sweep.search import run_search
from jaxlm.sweep.state import (
  METRIC,
  failed_state,
  final,
  is_finished,
  read_metrics,
  read_state,
  trial_identity,
  write_state,
  write_sweep_json,
)


def run(sweep: Sweep, workdir: str, *, parallel: int = 1, worker: bool = False,
        storage: str | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) a sweep in `workdir`; returns the results rows (none for a worker)."""
  if parallel < 1:
    raise JaxlmError(f"--parallel must be >= 1, got {parallel}")
  if workdir_lib.is_remote(workdir):
    raise JaxlmError(f"a sweep runs in a local --workdir, not {workdir}: its trials' locks and "
                     "logs need a filesystem (jaxlm sweep --summarize reads a gs:// sweep)")
  if sweep.trials is None:
    return run_search(sweep, workdir, parallel=parallel, worker=worker, storage=storage)
  if worker or storage:
    raise JaxlmError("--worker and --storage are for adaptive searches (get_search_space()); "
                     "this sweep file lists its trials")
  workdir_lib.prepare(workdir)
  write_sweep_json(sweep, workdir)
  progress = Progress(total=len(sweep.trials))
  queue = []
  for spec in sweep.trials:
    trial_dir = os.path.join(workdir, spec.name)
    state = read_state(trial_dir)
    if is_finished(state, sweep, spec):
      progress.count(state, final(read_metrics(trial_dir), METRIC))
    elif spec.error:
      state = failed_state(trial_identity(sweep, spec), spec.error, attempts=0)
      write_state(trial_dir, state)
      logging.warning("trial %s: invalid, not run: %s", spec.name, spec.error)
      progress.count(state, None)
    else:
      queue.append(spec)
  logging.info("sweep of %d trials in %s: %d done, %d invalid, %d to run, %d at a time",
               progress.total, workdir, progress.done, progress.failed, len(queue), parallel)

  def next_trial() -> Running | None:
    while queue:
      spec = queue.pop(0)
      trial_dir = os.path.join(workdir, spec.name)
      os.makedirs(trial_dir, exist_ok=True)
      lock_fd = try_lock(os.path.join(trial_dir, ".lock"))
      if lock_fd is None:
        logging.info("trial %s: being run by another process; skipped", spec.name)
        continue
      state = read_state(trial_dir)
      if is_finished(state, sweep, spec):  # Finished by another process meanwhile.
        os.close(lock_fd)
        progress.count(state, final(read_metrics(trial_dir), METRIC))
        continue
      return start_trial(sweep, spec, trial_dir, lock_fd)
    return None

  def on_finish(r: Running, state: dict[str, Any]) -> None:
    progress.count(state, final(read_metrics(r.trial_dir), METRIC))

  interrupted = run_pool(parallel, next_trial, on_finish, progress)
  return conclude(workdir, interrupted, progress)
