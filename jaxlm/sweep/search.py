"""Adaptive search with Optuna (optional extra: pip install 'jaxlm[sweep]').

The study holds the search: which points were asked, their intermediate and final val losses,
which were pruned. Optuna is imported only when a search runs, never by `import jaxlm.sweep`.
"""

from __future__ import annotations

import os
import signal
import socket
import types
from typing import Any

from absl import logging

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError
from jaxlm.sweep.overrides import trial_name
from jaxlm.sweep.plan import Sweep, check_trial
from jaxlm.sweep.pool import (
  Progress,
  Running,
  conclude,
  locked,
  run_pool,
  send_signal,
  start_trial,
  try_lock,
)
from jaxlm.sweep.space import Range, Trial
from jaxlm.sweep.state import (
  METRIC,
  failed_state,
  final,
  normal,
  read_metrics,
  read_state,
  trial_identity,
  write_state,
  write_sweep_json,
)


def import_optuna() -> types.ModuleType:
  try:
    import optuna
  except ImportError:
    raise JaxlmError("adaptive search needs optuna, which is not installed: "
                     "pip install 'jaxlm[sweep]' (or pip install optuna)") from None
  return optuna


def _sqlite_path(url: str) -> str | None:
  prefix = "sqlite:///"
  return url[len(prefix):] if url.startswith(prefix) else None


def open_study(sweep: Sweep, workdir: str, storage: str | None,
               worker: bool) -> tuple[Any, str | None]:
  """The study (created on first use) and, for SQLite, a lock file that serialises asks."""
  optuna = import_optuna()
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # The sweep logs its own progress.
  workdir = os.path.abspath(workdir)
  url = storage or "sqlite:///" + os.path.join(workdir, "study.db")
  db_file = _sqlite_path(url)
  lock = (os.path.abspath(db_file) + ".lock") if db_file else None
  # The study is named after the workdir, so every machine running the same command (same
  # --workdir name, shared --storage) joins the same study.
  name = os.path.basename(os.path.normpath(workdir))
  # Two workers seeded alike would propose the same points: only a lone sweep is seeded.
  seed = None if worker else sweep.cfg.seed
  sampler = (optuna.samplers.TPESampler(seed=seed) if sweep.sampler == "tpe"
             else optuna.samplers.RandomSampler(seed=seed))
  pruner = (optuna.pruners.MedianPruner() if sweep.pruner == "median"
            else optuna.pruners.NopPruner())
  fingerprint = normal({"sweep_file": os.path.basename(sweep.config_path),
                        "base_overrides": sweep.base_overrides, "space": sweep.space})
  with locked(lock):  # SQLite dislikes two processes creating its tables at once.
    try:
      kwargs = {"connect_args": {"timeout": 60}} if db_file else {}
      store = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # Bad URLs and missing drivers come as many exception types.
      raise JaxlmError(f"cannot open --storage {url!r}: {str(e).splitlines()[0]}") from None
    study = optuna.create_study(study_name=name, storage=store, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    existing = study.user_attrs.get("sweep")
    if existing is None:
      study.set_user_attr("sweep", fingerprint)
    elif existing != fingerprint:
      raise JaxlmError(f"study {name!r} in {url} belongs to another sweep ({existing}); "
                       "use another --workdir name or --storage")
  return study, lock


def _suggest(trial: Any, space: dict[str, Range]) -> Trial:
  out = {}
  for key, spec in space.items():
    kind = spec[0]
    if kind == "choice":
      out[key] = trial.suggest_categorical(key, list(spec[1]))
    elif kind == "int":
      out[key] = trial.suggest_int(key, spec[1], spec[2])
    else:
      out[key] = trial.suggest_float(key, spec[1], spec[2], log=kind == "log_uniform")
  return out


def run_search(sweep: Sweep, workdir: str, *, parallel: int = 1, worker: bool = False,
               storage: str | None = None) -> list[dict[str, Any]]:
  """Runs trials of the Optuna study until it holds `sweep.n_trials` trials.

  Any number of processes (on any number of machines, given a shared --storage) can do this at
  once: each asks the study for new points, so they run disjoint trials. Intermediate
  validation losses are read from each trial's metrics.jsonl as it grows and reported to the
  pruner; a pruned trial gets SIGTERM (it saves a checkpoint and exits).
  """
  optuna = import_optuna()
  workdir_lib.prepare(workdir)
  study, lock = open_study(sweep, workdir, storage, worker)
  write_sweep_json(sweep, workdir)
  progress = Progress(total=sweep.n_trials)
  states = optuna.trial.TrialState
  by_number = {t.number: t for t in study.get_trials(deepcopy=False)}

  # Trials of this workdir that an earlier (interrupted) run left unfinished: resume them first.
  resumable = []
  for entry in sorted(os.listdir(workdir)):
    trial_dir = os.path.join(workdir, entry)
    state = read_state(trial_dir)
    if state is None or "optuna_trial" not in state:
      continue
    frozen = by_number.get(state["optuna_trial"])
    if state["status"] in ("running", "interrupted") and frozen is not None and (
        frozen.state == states.RUNNING):
      resumable.append((trial_dir, state, frozen))
    elif state["status"] in ("done", "failed", "pruned"):
      progress.count(state, final(read_metrics(trial_dir), METRIC))
  exhausted = False

  def next_trial() -> Running | None:
    nonlocal exhausted
    while resumable:
      trial_dir, state, frozen = resumable.pop(0)
      lock_fd = try_lock(os.path.join(trial_dir, ".lock"))
      if lock_fd is None:
        continue  # Another worker on this workdir is running it.
      spec = check_trial(sweep.cfg, state["overrides"], state["name"])
      r = start_trial(sweep, spec, trial_dir, lock_fd)
      r.optuna_trial = optuna.trial.Trial(study, frozen._trial_id)
      r.reported = set(frozen.intermediate_values)
      return r
    while not exhausted:
      with locked(lock):  # Count and ask atomically, so the study ends at exactly n_trials.
        if len(study.get_trials(deepcopy=False)) >= sweep.n_trials:
          exhausted = True
          return None
        trial = study.ask()
      overrides = _suggest(trial, sweep.space)
      name = f"{trial.number:04d}_{trial_name(overrides)}"
      trial_dir = os.path.join(workdir, name)
      spec = check_trial(sweep.cfg, overrides, name)
      extra = {"optuna_trial": trial.number}
      trial.set_user_attr("trial_dir", os.path.abspath(trial_dir))
      trial.set_user_attr("host", socket.gethostname())
      if spec.error:  # An impossible point (say d_model not divisible by n_head): not run.
        state = failed_state({**extra, **trial_identity(sweep, spec)}, spec.error, attempts=0)
        write_state(trial_dir, state)
        trial.set_user_attr("error", spec.error)
        study.tell(trial, state=states.FAIL)
        logging.warning("trial %s: invalid, not run: %s", name, spec.error)
        progress.count(state, None)
        continue
      os.makedirs(trial_dir, exist_ok=True)
      lock_fd = try_lock(os.path.join(trial_dir, ".lock"))
      r = start_trial(sweep, spec, trial_dir, lock_fd, extra)
      r.optuna_trial = trial
      return r
    return None

  def watch(r: Running, record: dict[str, Any]) -> None:
    step, val = record.get("step", 0), record.get(METRIC)
    # Step 0 is the untrained model, the same for every trial: nothing to compare there.
    if not isinstance(val, float) or step < 1 or step in r.reported or r.prune:
      return
    r.optuna_trial.report(val, step)
    r.reported.add(step)
    if r.optuna_trial.should_prune():
      logging.info("trial %s: pruned at step %d (val loss %.4f is worse than the median)",
                   r.spec.name, step, val)
      r.prune = True
      send_signal(r, signal.SIGTERM)

  def on_finish(r: Running, state: dict[str, Any]) -> None:
    status = state["status"]
    val = final(read_metrics(r.trial_dir), METRIC)
    if status == "done" and val is None:
      state = failed_state(state, "the run wrote no val/loss")
      status = state["status"]
      write_state(r.trial_dir, state)
    if status == "done":
      study.tell(r.optuna_trial, val)
    elif status == "pruned":
      study.tell(r.optuna_trial, state=states.PRUNED)
    elif status == "failed":
      r.optuna_trial.set_user_attr("error", state["error"])
      study.tell(r.optuna_trial, state=states.FAIL)
    # Interrupted trials stay RUNNING in the study: the next run of this command resumes them.
    progress.count(state, val)

  logging.info("adaptive search (%s sampler, %s pruner) of %d trials in %s: %d in the study "
               "already, %d to resume here, %d at a time%s", sweep.sampler, sweep.pruner,
               sweep.n_trials, workdir, len(by_number), len(resumable), parallel,
               " (worker)" if worker else "")
  interrupted = run_pool(parallel, next_trial, on_finish, progress, watch)
  if not worker:
    try:
      best = study.best_trial
      logging.info("best trial %d: val loss %.4f with %s", best.number, best.value, best.params)
    except ValueError:
      pass  # No trial completed.
  return conclude(workdir, interrupted, progress, summary=not worker)
