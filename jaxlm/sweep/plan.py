"""Planning a sweep: loading its file and checking every trial (or range) before anything runs.

`prepare` turns a sweep file and the command line into a `Sweep`: the locked base config and
either the checked trials of a grid (`TrialSpec`s) or the search space of an adaptive search.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import types
from typing import Any

import ml_collections
from absl import logging

from jaxlm.errors import JaxlmError
from jaxlm.sweep import ladders as ladder_lib
from jaxlm.sweep.overrides import digest, flag_value, resolve, trial_name
from jaxlm.sweep.space import Range, Trial, check_range

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")


# ---------------------------------------------------------------------------------------------
# Loading sweep and config files.
# ---------------------------------------------------------------------------------------------

def load_module(path: str) -> types.ModuleType:
  """Executes a Python config/sweep file (`path` may end in ':arg', which is ignored here)."""
  file = path.split(":", 1)[0]
  if not os.path.isfile(file):
    raise JaxlmError(f"sweep file not found: {file}")
  name = "jaxlm_sweepfile_" + hashlib.sha1(os.path.abspath(file).encode()).hexdigest()[:8]
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_experiment(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of another config file (path relative to the file `relative_to`).

  How a sweep file starts from an experiment without copying it:
  `get_config = lambda: sweep.load_experiment("../shakespeare_char.py", __file__)`.
  """
  if relative_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  file, *arg = path.split(":", 1)
  return load_module(file).get_config(*arg)


# ---------------------------------------------------------------------------------------------
# Checking trials against the locked config, before anything runs.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrialSpec:
  """One trial: its overrides and what running it must reach."""
  name: str
  overrides: Trial
  steps: int  # The trial's train.steps: a run that stopped before it was interrupted.
  stop_at: int
  error: str | None = None  # An impossible value: the trial is failed without being run.


def check_trial(cfg: ml_collections.ConfigDict, overrides: Trial, name: str) -> TrialSpec:
  """Applies and validates one trial (raises on unknown keys and wrong types)."""
  from jaxlm import config as config_lib  # Imports jax: only once the cheap checks have passed.
  resolved = resolve(cfg, overrides)
  try:
    config_lib.validate_config(resolved)
    error = None
  except JaxlmError as e:
    error = str(e)
  return TrialSpec(name=name, overrides=dict(overrides), steps=resolved.train.steps,
                   stop_at=resolved.train.stop_at, error=error)


def plan_trials(cfg: ml_collections.ConfigDict, trials: Any) -> list[TrialSpec]:
  """The trials of a grid sweep, checked: unknown keys, wrong types, duplicates, emptiness.

  Those are mistakes in the sweep file and raise JaxlmError naming the trial and key. A value
  that `config.validate_config` rejects (say d_model not divisible by n_head) only fails that
  trial: it is recorded with its error and the other trials run.
  """
  if not isinstance(trials, (list, tuple)):
    raise JaxlmError(f"get_sweep() must return a list of dicts of overrides, got "
                     f"{type(trials).__name__}")
  if not trials:
    raise JaxlmError("the sweep is empty: get_sweep() returned no trials")
  n = len(trials)
  for i, overrides in enumerate(trials, 1):
    if not isinstance(overrides, dict):
      raise JaxlmError(f"trial {i}/{n}: expected a dict of overrides, got {overrides!r}")
    try:
      resolve(cfg, overrides)
    except JaxlmError as e:
      raise JaxlmError(f"trial {i}/{n} ({trial_name(overrides)}): {e}") from None
  names: dict[str, int] = {}
  specs = []
  for i, overrides in enumerate(trials, 1):
    name = trial_name(overrides)
    if name in names:
      first = trials[names[name] - 1]
      if json.dumps(first, sort_keys=True) == json.dumps(overrides, sort_keys=True):
        raise JaxlmError(f"trial {i}/{n} repeats trial {names[name]}/{n} ({name})")
      name = f"{name}-{digest(overrides)}"  # Values that differ beyond the name's precision.
    names[name] = i
    specs.append(check_trial(cfg, overrides, name))
  return specs


def check_space(cfg: ml_collections.ConfigDict, space: Any) -> None:
  """Every key of an adaptive search space exists and its range fits the key's type."""
  if not isinstance(space, dict) or not space:
    raise JaxlmError("get_search_space() must return a non-empty dict {key: range}")
  for key, spec in space.items():
    check_range(key, spec)
    points = spec[1] if spec[0] == "choice" else spec[1:]
    for value in points:
      try:
        resolve(cfg, {key: value})
      except JaxlmError as e:
        raise JaxlmError(f"search space: {e}") from None


# ---------------------------------------------------------------------------------------------
# A prepared sweep: what the CLI hands to `run`.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sweep:
  config_path: str  # Absolute path of the sweep file (with ':arg' if any): each trial's --config.
  cfg: ml_collections.ConfigDict  # The locked base config: sweep file + command-line overrides.
  base_overrides: Trial  # Command-line overrides, passed on to every trial.
  trials: list[TrialSpec] | None = None  # A grid sweep...
  space: dict[str, Range] | None = None  # ...or an adaptive search over these ranges.
  n_trials: int = 0
  ladder: dict[str, Any] | None = None  # A scaling ladder's sizes and budgets (ladder.record).
  sampler: str = "tpe"
  pruner: str = "median"
  # The command that trains one trial, before its flags (tests substitute a fake trainer).
  trainer: list[str] = dataclasses.field(
      default_factory=lambda: [sys.executable, "-m", "jaxlm.cli", "train"])


def call_sweep_file(file: str, fn: Any, arg: list[str]) -> Any:
  """The sweep file's get_sweep/get_search_space/get_ladder(*arg); its own error becomes one
  line naming the file and the function (a traceback into user code says less)."""
  try:
    return fn(*arg)
  except JaxlmError:
    raise
  except Exception as e:
    raise JaxlmError(f"{file}: {fn.__name__}({', '.join(map(repr, arg))}) raised "
                     f"{type(e).__name__}: {e}") from None


def prepare(config_path: str, cfg: ml_collections.ConfigDict, base_overrides: Trial, *,
            n_trials: int | None = None) -> Sweep:
  """Loads the sweep file at `config_path` and checks all its trials (or its search space)."""
  file, *arg = config_path.split(":", 1)
  module = load_module(file)
  config_path = ":".join([os.path.abspath(file), *arg])
  kinds = [k for k in ("get_sweep", "get_search_space", "get_ladder") if hasattr(module, k)]
  if len(kinds) != 1:
    which = " and ".join(f"{k}()" for k in kinds) if kinds else "neither"
    raise JaxlmError(f"{file} must define get_sweep() (a list of trials), "
                     f"get_search_space() (an adaptive search) or get_ladder() (a scaling "
                     f"ladder), not {which}")
  base = dict(base_overrides)
  if kinds[0] != "get_search_space":
    if n_trials is not None:
      raise JaxlmError("--n_trials is for adaptive searches; this sweep file lists its trials")
    record = None
    if kinds[0] == "get_ladder":
      lad = call_sweep_file(file, module.get_ladder, arg)
      trials, points = ladder_lib.plan(cfg, lad)
    else:
      trials = call_sweep_file(file, module.get_sweep, arg)
    specs = plan_trials(cfg, trials)
    if kinds[0] == "get_ladder":
      record = ladder_lib.record(lad, points, [s.name for s in specs])
    for key in sorted({k for s in specs for k in s.overrides} & set(base)):
      logging.warning("--config.%s is swept: each trial's own value replaces it", key)
    return Sweep(config_path=config_path, cfg=cfg, base_overrides=base, trials=specs,
                 ladder=record)

  space = call_sweep_file(file, module.get_search_space, arg)
  check_space(cfg, space)
  n = n_trials if n_trials is not None else getattr(module, "N_TRIALS", None)
  if not isinstance(n, int) or n < 1:
    raise JaxlmError(f"an adaptive search needs a number of trials >= 1: set N_TRIALS in {file} "
                     f"or pass --n_trials (got {n!r})")
  sampler = getattr(module, "SAMPLER", "tpe")
  pruner = getattr(module, "PRUNER", "median")
  if sampler not in SAMPLERS:
    raise JaxlmError(f"unknown SAMPLER={sampler!r}: expected one of {', '.join(SAMPLERS)}")
  if pruner not in PRUNERS:
    raise JaxlmError(f"unknown PRUNER={pruner!r}: expected one of {', '.join(PRUNERS)}")
  if cfg.train.eval_every < 1:
    raise JaxlmError("an adaptive search optimises the validation loss: set train.eval_every "
                     ">= 1")
  return Sweep(config_path=config_path, cfg=cfg, base_overrides=base, space=dict(space),
               n_trials=n, sampler=sampler, pruner=pruner)


def wandb_overrides(cfg: ml_collections.ConfigDict, overrides: Trial, trial_dir: str) -> Trial:
  """With metrics.wandb on, a trial's W&B run is named after the trial and grouped under the
  sweep (the basename of the sweep's workdir), where neither `cfg` nor `overrides` names it."""
  if "metrics" not in cfg:  # A config written before the metrics section existed.
    return {}
  value = lambda key: overrides.get(f"metrics.{key}", cfg.metrics[key])
  if not value("wandb"):
    return {}
  trial_dir = os.path.abspath(trial_dir)
  names = {"wandb_group": os.path.basename(os.path.dirname(trial_dir)),
           "wandb_name": os.path.basename(trial_dir)}
  return {f"metrics.{key}": name for key, name in names.items() if not value(key)}


def train_command(sweep: Sweep, trial_dir: str, overrides: Trial) -> list[str]:
  """The `jaxlm train` command of one trial: the sweep file, then every override as a flag."""
  merged = {k: v for k, v in sweep.base_overrides.items() if k not in overrides}
  merged.update(overrides)
  merged.update(wandb_overrides(sweep.cfg, merged, trial_dir))
  return [*sweep.trainer, "--config", sweep.config_path, "--workdir", trial_dir,
          *(f"--config.{k}={flag_value(v)}" for k, v in merged.items())]
