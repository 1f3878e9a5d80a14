"""Hyperparameter sweeps: trials from a sweep file, each run as a `jaxlm train` process, summarised.

A sweep file is a config file (`get_config()`) plus either `get_sweep()`, returning a list of
trials, each a dict of dotted overrides ({"optim.lr": 3e-4}), or `get_search_space()`,
returning ranges for an adaptive Optuna search ({"optim.lr": ("log_uniform", 1e-4, 3e-3)})
with `N_TRIALS` (and optionally `SAMPLER` = "tpe" | "random", `PRUNER` = "median" | "none").

Layout of a sweep workdir W: one directory per trial (named after its overrides) holding the
trial's own run (config.json, metrics.jsonl, checkpoints/), its log `train.log` and its sweep
state `trial.json`; then results.csv, results.md and PNG plots, rebuilt from those alone.
Running the same sweep again skips finished trials, resumes interrupted ones from their
checkpoints and tries failed ones again (except those whose values validate_config rejects).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import dataclasses
import difflib
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

Trial = dict[str, Any]  # Dotted config key -> value, e.g. {"optim.lr": 3e-4, "model.n_layer": 6}.
Range = tuple  # ("uniform"|"log_uniform"|"int", low, high) or ("choice", [values]).

METRIC = "val/loss"  # Every sweep minimises the final validation loss of its trials.
RANGE_KINDS = ("uniform", "log_uniform", "int", "choice")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
STATE_FILE = "trial.json"
LOG_FILE = "train.log"
_POLL_SEC = 0.5
_PROGRESS_EVERY_SEC = 60.0
_LOG_HEADER = "=== jaxlm sweep: attempt "


# ---------------------------------------------------------------------------------------------
# Building trials: helpers for sweep files.
# ---------------------------------------------------------------------------------------------

def axis(key: str, values: Sequence[Any]) -> list[Trial]:
  """One trial per value: axis("optim.lr", [1e-3, 3e-3]) -> [{"optim.lr": 1e-3}, ...]."""
  return [{key: v} for v in values]


def _as_axes(part: list[Trial] | dict[str, Sequence[Any]]) -> list[list[Trial]]:
  if isinstance(part, dict):
    return [axis(key, values) for key, values in part.items()]
  return [list(part)]


def _merge(a: Trial, b: Trial) -> Trial:
  shared = sorted(set(a) & set(b))
  if shared:
    raise JaxlmError(f"{shared[0]} is swept twice in one product or zip")
  return {**a, **b}


def product(*parts: list[Trial] | dict[str, Sequence[Any]]) -> list[Trial]:
  """Every combination of the parts; the first varies slowest.

  A part is a list of trials (e.g. from `axis` or `zipped`) or a dict {key: [values]}, which
  stands for one axis per key: product({"optim.lr": [1e-3, 3e-3], "model.n_layer": [4, 6]}).
  """
  trials: list[Trial] = [{}]
  for part in parts:
    for ax in _as_axes(part):
      trials = [_merge(t, u) for t in trials for u in ax]
  return trials


def zipped(*parts: list[Trial] | dict[str, Sequence[Any]]) -> list[Trial]:
  """Trial i merges trial i of every part (all of one length): values that move together."""
  axes = [ax for part in parts for ax in _as_axes(part)]
  lengths = sorted({len(ax) for ax in axes})
  if len(lengths) > 1:
    raise JaxlmError(f"zipped parts differ in length: {', '.join(map(str, lengths))}")
  trials: list[Trial] = [{} for _ in range(lengths[0] if lengths else 0)]
  for ax in axes:
    trials = [_merge(t, u) for t, u in zip(trials, ax, strict=True)]
  return trials


def uniform(low: float, high: float) -> Range:
  return ("uniform", float(low), float(high))


def log_uniform(low: float, high: float) -> Range:
  return ("log_uniform", float(low), float(high))


def integer(low: int, high: int) -> Range:
  """Integers from `low` to `high`, both included."""
  return ("int", int(low), int(high))


def choice(*values: Any) -> Range:
  return ("choice", list(values))


def check_range(key: str, spec: Any) -> None:
  """Raises JaxlmError unless `spec` is one of the range forms above."""
  kind = spec[0] if isinstance(spec, (tuple, list)) and spec else None
  if kind == "choice" and len(spec) == 2 and isinstance(spec[1], (list, tuple)) and spec[1]:
    return
  if kind in ("uniform", "log_uniform", "int") and len(spec) == 3:
    low, high = spec[1], spec[2]
    number = (int,) if kind == "int" else (int, float)
    if (isinstance(low, number) and isinstance(high, number) and not isinstance(low, bool)
        and not isinstance(high, bool)):
      if not low < high:
        raise JaxlmError(f"range of {key}: low must be < high, got {spec!r}")
      if kind == "log_uniform" and low <= 0:
        raise JaxlmError(f"range of {key}: log_uniform needs low > 0, got {spec!r}")
      return
  raise JaxlmError(f"range of {key}: expected (kind, low, high) with kind uniform, log_uniform "
                   f"or int, or ('choice', [values]); got {spec!r}")


def _round(value: float, digits: int = 4) -> float:
  """`value` to `digits` significant digits: readable trial names, a negligible change."""
  return float(f"{value:.{digits}g}")


def _draw(rng: np.random.Generator, spec: Range) -> Any:
  kind = spec[0]
  if kind == "choice":
    return spec[1][int(rng.integers(len(spec[1])))]
  if kind == "int":
    return int(rng.integers(spec[1], spec[2] + 1))
  if kind == "log_uniform":
    return _round(math.exp(rng.uniform(math.log(spec[1]), math.log(spec[2]))))
  return _round(rng.uniform(spec[1], spec[2]))


def sample(space: dict[str, Range], n: int, seed: int = 0) -> list[Trial]:
  """`n` random trials from `space` ({key: range}); the same seed gives the same trials."""
  for key, spec in space.items():
    check_range(key, spec)
  rng = np.random.default_rng(seed)
  return [{key: _draw(rng, spec) for key, spec in space.items()} for _ in range(n)]


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


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def set_override(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """cfg[key] = value for a dotted key of a locked config; JaxlmError names the key on failure."""
  known = flatten(cfg)
  if any(k.startswith(key + ".") for k in known):
    raise JaxlmError(f"{key} is a config section, not a value: sweep one of its keys")
  if key not in known:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise JaxlmError(f"unknown config key {key}{hint}")
  current = known[key]
  if not isinstance(value, (bool, int, float, str)):
    raise JaxlmError(f"{key}={value!r}: a swept value must be a bool, int, float or str")
  if isinstance(value, bool) != isinstance(current, bool):
    raise JaxlmError(f"{key} must be {type(current).__name__}, got {type(value).__name__} "
                     f"{value!r}")
  *sections, name = key.split(".")
  node = cfg
  for section in sections:
    node = node[section]
  try:
    node[name] = value
  except TypeError:
    raise JaxlmError(f"{key} must be {type(current).__name__}, got {type(value).__name__} "
                     f"{value!r}") from None


def resolve(cfg: ml_collections.ConfigDict, overrides: Trial) -> ml_collections.ConfigDict:
  """A locked copy of `cfg` with `overrides` applied."""
  out = copy.deepcopy(cfg)
  out.lock()
  for key, value in overrides.items():
    if not isinstance(key, str):
      raise JaxlmError(f"override keys are dotted strings such as 'optim.lr', got {key!r}")
    set_override(out, key, value)
  return out


def _short(value: Any) -> str:
  return f"{value:.6g}" if isinstance(value, float) else str(value)


def trial_name(overrides: Trial) -> str:
  """A readable directory name: 'optim.lr=0.0003,model.n_layer=6' ('defaults' if empty)."""
  if not overrides:
    return "defaults"
  name = ",".join(f"{k}={_short(v)}" for k, v in overrides.items())
  name = name.replace("/", "_").replace("\0", "")  # A path in a value must not nest directories.
  if len(name) > 120:  # File systems cap names at 255 bytes; keep them short and still unique.
    name = name[:100] + "-" + _digest(overrides)
  return name


def _digest(overrides: Trial) -> str:
  return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def flag_value(value: Any) -> str:
  """`value` as ml_collections' config flags parse it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)  # Round-trips exactly.
  return str(value)


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
      name = f"{name}-{_digest(overrides)}"  # Values that differ beyond the name's precision.
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
  sampler: str = "tpe"
  pruner: str = "median"
  # The command that trains one trial, before its flags (tests substitute a fake trainer).
  trainer: list[str] = dataclasses.field(
      default_factory=lambda: [sys.executable, "-m", "jaxlm.cli", "train"])


def prepare(config_path: str, cfg: ml_collections.ConfigDict, base_overrides: Trial, *,
            n_trials: int | None = None) -> Sweep:
  """Loads the sweep file at `config_path` and checks all its trials (or its search space)."""
  file, *arg = config_path.split(":", 1)
  module = load_module(file)
  config_path = ":".join([os.path.abspath(file), *arg])
  has_grid, has_space = hasattr(module, "get_sweep"), hasattr(module, "get_search_space")
  if has_grid == has_space:
    which = "both" if has_grid else "neither"
    raise JaxlmError(f"{file} must define get_sweep() (a list of trials) or "
                     f"get_search_space() (an adaptive search), not {which}")
  base = dict(base_overrides)
  if has_grid:
    if n_trials is not None:
      raise JaxlmError("--n_trials is for adaptive searches; this sweep file lists its trials")
    trials = module.get_sweep(*arg)
    specs = plan_trials(cfg, trials)
    for key in sorted({k for s in specs for k in s.overrides} & set(base)):
      logging.warning("--config.%s is swept: each trial's own value replaces it", key)
    return Sweep(config_path=config_path, cfg=cfg, base_overrides=base, trials=specs)

  space = module.get_search_space(*arg)
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


def train_command(sweep: Sweep, trial_dir: str, overrides: Trial) -> list[str]:
  """The `jaxlm train` command of one trial: the sweep file, then every override as a flag."""
  merged = {k: v for k, v in sweep.base_overrides.items() if k not in overrides}
  merged.update(overrides)
  return [*sweep.trainer, "--config", sweep.config_path, "--workdir", trial_dir,
          *(f"--config.{k}={flag_value(v)}" for k, v in merged.items())]


# ---------------------------------------------------------------------------------------------
# Trial state on disk.
# ---------------------------------------------------------------------------------------------

def read_state(trial_dir: str) -> dict[str, Any] | None:
  path = workdir_lib.path(trial_dir) / STATE_FILE
  if not path.exists():
    return None
  return json.loads(workdir_lib.read_text(path))


def write_state(trial_dir: str, state: dict[str, Any]) -> None:
  os.makedirs(trial_dir, exist_ok=True)
  # Atomic (a reader never sees half a file); insertion order: the sweep file's order of keys.
  workdir_lib.write_text(os.path.join(trial_dir, STATE_FILE), json.dumps(state, indent=2))


def _normal(x: Any) -> Any:
  return json.loads(json.dumps(x))


def is_finished(state: dict[str, Any] | None, sweep: Sweep, spec: TrialSpec) -> bool:
  """Done with these very overrides (a changed command line runs the trial again)."""
  return (state is not None and state.get("status") == "done"
          and state.get("overrides") == _normal(spec.overrides)
          and state.get("base_overrides") == _normal(sweep.base_overrides))


def read_metrics(trial_dir: str) -> list[dict[str, Any]]:
  """A run's metrics.jsonl records (local or gs://; see workdir.Appender for how it is kept)."""
  path = workdir_lib.path(trial_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = workdir_lib.read_text(path).splitlines(keepends=True)
  # A line still being written is skipped.
  return [json.loads(line) for line in lines if line.endswith("\n")]


class MetricsTail:
  """Reads the records appended to a trial's metrics.jsonl since the last call."""

  def __init__(self, trial_dir: str):
    self.path = os.path.join(trial_dir, "metrics.jsonl")
    self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path, "rb") as f:
      f.seek(self.offset)
      data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    self.offset += len(complete)
    return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line]


def error_line(log_path: str, offset: int = 0) -> str:
  """The `jaxlm: error:` line of a trial's log since `offset`, else its last line."""
  try:
    with open(log_path, "rb") as f:
      f.seek(offset)
      lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()]
  except OSError:
    return "no log"
  lines = [line for line in lines if line]
  errors = [line for line in lines if line.startswith("jaxlm: error:")]
  line = errors[-1][len("jaxlm: error:"):].strip() if errors else (lines[-1] if lines else "")
  return (line[:300] + "...") if len(line) > 300 else (line or "exited with no output")


def _try_lock(path: str) -> int | None:
  """An exclusive lock on `path` (an open fd), or None if another process holds it."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  return fd


@contextlib.contextmanager
def _locked(path: str | None) -> Iterator[None]:
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
# Running trials: N `jaxlm train` processes at a time.
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
  state = {**previous, **(extra_state or {}),
           "name": spec.name, "overrides": _normal(spec.overrides),
           "base_overrides": _normal(sweep.base_overrides), "status": "running", "error": None,
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


def _final(records: list[dict[str, Any]], key: str) -> float | None:
  values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
  return float(values[-1]) if values else None


def finish_trial(r: Running) -> dict[str, Any]:
  """Records how a trial ended: done, interrupted, pruned or failed (with its error)."""
  rc = r.proc.wait()
  r.read_metrics()
  ends = [rec["step"] for rec in r.records if "wall_time_sec" in rec]
  reached = bool(ends) and (ends[-1] >= r.spec.steps or ends[-1] == r.spec.stop_at)
  error = None
  if rc == 0 and reached:
    status = "done"
  elif r.prune:
    status = "pruned"
  elif rc == 0 or r.signalled:
    status = "interrupted"  # Stopped by us or by someone's SIGTERM: resumable.
  else:
    status = "failed"
    error = error_line(os.path.join(r.trial_dir, LOG_FILE), r.log_offset)
  state = {**r.state, "status": status, "error": error, "returncode": rc,
           "finished_at": time.time()}
  write_state(r.trial_dir, state)
  os.close(r.lock_fd)
  val = r.last.get(METRIC)
  took = time.time() - r.started
  if status == "failed":
    logging.warning("trial %s: failed after %.0fs: %s", r.spec.name, took, error)
  else:
    logging.info("trial %s: %s at step %s after %.0fs%s", r.spec.name, status,
                 r.last.get("step", 0), took,
                 f" | val loss {val:.4f}" if isinstance(val, float) else "")
  return state


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
      if val is not None and (self.best is None or val < self.best[0]):
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
          _signal(r, signal.SIGTERM)
        if interrupts.count > 1:
          _signal(r, signal.SIGKILL)
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


def _signal(r: Running, sig: signal.Signals) -> None:
  with contextlib.suppress(ProcessLookupError):
    r.proc.send_signal(sig)


# ---------------------------------------------------------------------------------------------
# Grid sweeps.
# ---------------------------------------------------------------------------------------------

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
  _write_sweep_json(sweep, workdir)
  progress = Progress(total=len(sweep.trials))
  queue = []
  for spec in sweep.trials:
    trial_dir = os.path.join(workdir, spec.name)
    state = read_state(trial_dir)
    if is_finished(state, sweep, spec):
      progress.count(state, _final(read_metrics(trial_dir), METRIC))
    elif spec.error:
      state = {"name": spec.name, "overrides": _normal(spec.overrides),
               "base_overrides": _normal(sweep.base_overrides), "status": "failed",
               "error": spec.error, "attempts": 0}
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
      lock_fd = _try_lock(os.path.join(trial_dir, ".lock"))
      if lock_fd is None:
        logging.info("trial %s: being run by another process; skipped", spec.name)
        continue
      state = read_state(trial_dir)
      if is_finished(state, sweep, spec):  # Finished by another process meanwhile.
        os.close(lock_fd)
        progress.count(state, _final(read_metrics(trial_dir), METRIC))
        continue
      return start_trial(sweep, spec, trial_dir, lock_fd)
    return None

  def on_finish(r: Running, state: dict[str, Any]) -> None:
    progress.count(state, _final(read_metrics(r.trial_dir), METRIC))

  interrupted = run_pool(parallel, next_trial, on_finish, progress)
  return _conclude(workdir, interrupted, progress)


def _write_sweep_json(sweep: Sweep, workdir: str) -> None:
  record = {"config": sweep.config_path, "base_overrides": _normal(sweep.base_overrides),
            "trials": [s.name for s in sweep.trials or []],
            "search_space": _normal(sweep.space), "n_trials": sweep.n_trials}
  workdir_lib.write_text(os.path.join(workdir, "sweep.json"), json.dumps(record, indent=2))


def _conclude(workdir: str, interrupted: bool, progress: Progress,
              summary: bool = True) -> list[dict[str, Any]]:
  rows = summarize(workdir) if summary else []
  if interrupted:
    logging.warning("sweep stopped: run the same command to resume (%d/%d trials done)",
                    progress.done, progress.total)
  else:
    progress.log([])
  if progress.failed and not progress.done and not progress.pruned and not interrupted:
    raise JaxlmError(f"every trial failed; see the logs in {workdir}/*/{LOG_FILE}")
  return rows


# ---------------------------------------------------------------------------------------------
# Adaptive search with Optuna (optional extra: pip install 'jaxlm[sweep]').
# ---------------------------------------------------------------------------------------------

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
  fingerprint = _normal({"sweep_file": os.path.basename(sweep.config_path),
                         "base_overrides": sweep.base_overrides, "space": sweep.space})
  with _locked(lock):  # SQLite dislikes two processes creating its tables at once.
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
  _write_sweep_json(sweep, workdir)
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
      progress.count(state, _final(read_metrics(trial_dir), METRIC))
  exhausted = False

  def next_trial() -> Running | None:
    nonlocal exhausted
    while resumable:
      trial_dir, state, frozen = resumable.pop(0)
      lock_fd = _try_lock(os.path.join(trial_dir, ".lock"))
      if lock_fd is None:
        continue  # Another worker on this workdir is running it.
      spec = check_trial(sweep.cfg, state["overrides"], state["name"])
      r = start_trial(sweep, spec, trial_dir, lock_fd)
      r.optuna_trial = optuna.trial.Trial(study, frozen._trial_id)
      r.reported = set(frozen.intermediate_values)
      return r
    while not exhausted:
      with _locked(lock):  # Count and ask atomically, so the study ends at exactly n_trials.
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
        state = {**extra, "name": name, "overrides": _normal(overrides),
                 "base_overrides": _normal(sweep.base_overrides), "status": "failed",
                 "error": spec.error, "attempts": 0}
        write_state(trial_dir, state)
        trial.set_user_attr("error", spec.error)
        study.tell(trial, state=states.FAIL)
        logging.warning("trial %s: invalid, not run: %s", name, spec.error)
        progress.count(state, None)
        continue
      os.makedirs(trial_dir, exist_ok=True)
      lock_fd = _try_lock(os.path.join(trial_dir, ".lock"))
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
      _signal(r, signal.SIGTERM)

  def on_finish(r: Running, state: dict[str, Any]) -> None:
    status = state["status"]
    val = _final(read_metrics(r.trial_dir), METRIC)
    if status == "done" and val is None:
      status = state["status"] = "failed"
      state["error"] = "the run wrote no val/loss"
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
  return _conclude(workdir, interrupted, progress, summary=not worker)


# ---------------------------------------------------------------------------------------------
# Results: a table and plots, rebuilt from the trial directories alone.
# ---------------------------------------------------------------------------------------------

def collect(workdir: str) -> list[dict[str, Any]]:
  """One row per trial directory of `workdir`: finished trials first, by final val loss."""
  root = workdir_lib.path(workdir)
  if not root.is_dir():
    raise JaxlmError(f"no sweep in {workdir!r}: the directory does not exist")
  rows = []
  for entry in sorted(p.name for p in root.iterdir()):
    trial_dir = os.fspath(root / entry)
    state = read_state(trial_dir)
    if state is None:
      continue
    records = read_metrics(trial_dir)
    vals = [r[METRIC] for r in records if isinstance(r.get(METRIC), (int, float))]
    speeds = [r["tokens_per_sec"] for r in records
              if isinstance(r.get("tokens_per_sec"), (int, float))]
    walls = [r["wall_time_sec"] for r in records if "wall_time_sec" in r]
    rows.append({
        "trial": state["name"], "status": state["status"], "error": state.get("error") or "",
        "overrides": state.get("overrides", {}),
        "final_val_loss": float(vals[-1]) if vals else None,
        "best_val_loss": float(min(vals)) if vals else None,
        "steps": max((r["step"] for r in records), default=None),
        # Median over log intervals: robust to the odd slow interval on a shared machine.
        "tokens_per_sec": float(np.median(speeds)) if speeds else None,
        "wall_time_sec": float(sum(walls)) if walls else None,  # Summed over resumptions.
        "attempts": state.get("attempts", 0), "dir": trial_dir, "records": records})
  if not rows:
    raise JaxlmError(f"no trials in {workdir!r}: none of its directories has a {STATE_FILE}")
  # A pruned, interrupted or failed trial's last val loss is partial: it ranks after the others.
  rows.sort(key=lambda r: (r["final_val_loss"] is None, r["status"] != "done",
                           r["final_val_loss"] or 0.0, r["trial"]))
  return rows


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
  keys: list[str] = []
  for row in sorted(rows, key=lambda r: r["trial"]):
    keys.extend(k for k in row["overrides"] if k not in keys)
  return keys


CSV_COLUMNS = ("final_val_loss", "best_val_loss", "steps", "tokens_per_sec", "wall_time_sec",
               "status", "error")


def summarize(workdir: str) -> list[dict[str, Any]]:
  """Writes results.csv, results.md and the plots of `workdir`; returns the rows."""
  rows = collect(workdir)
  keys = swept_keys(rows)
  _write_csv(os.path.join(workdir, "results.csv"), rows, keys)
  plots = write_plots(workdir, rows, keys)
  _write_markdown(os.path.join(workdir, "results.md"), rows, keys, plots, workdir)
  logging.info("results of %d trials: %s, %s and %d plot(s) in %s", len(rows), "results.csv",
               "results.md", len(plots), workdir)
  return rows


def _atomic_write(path: str, text: str) -> None:
  workdir_lib.write_text(path, text)  # Several processes may summarise at once: last one wins.


def _write_csv(path: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
  import io
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["trial", *keys, *CSV_COLUMNS])
  for row in rows:
    w.writerow([row["trial"], *(row["overrides"].get(k, "") for k in keys),
                *("" if row[c] is None else row[c] for c in CSV_COLUMNS)])
  _atomic_write(path, buf.getvalue())


def _cell(value: Any, fmt: str = "") -> str:
  if value is None or value == "":
    return "-"
  text = format(value, fmt) if fmt else (_short(value) if isinstance(value, float) else str(value))
  return text.replace("|", "\\|")


def _write_markdown(path: str, rows: list[dict[str, Any]], keys: list[str], plots: list[str],
                    workdir: str) -> None:
  from jaxlm import metrics  # For format_duration; imported lazily (it imports jax).
  counts = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  lines = [f"# Sweep results: {os.path.basename(os.path.normpath(workdir))}", "",
           f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}), "
           "finished trials first, sorted by final validation loss (lower is better).", "",
           "| # | " + " | ".join(f"`{k}`" for k in keys) +
           " | final val loss | best val loss | steps | tokens/s | wall time | status |",
           "|---" * (len(keys) + 7) + "|"]
  for i, row in enumerate(rows, 1):
    wall = row["wall_time_sec"]
    cells = [str(i), *(_cell(row["overrides"].get(k)) for k in keys),
             _cell(row["final_val_loss"], ".4f"), _cell(row["best_val_loss"], ".4f"),
             _cell(row["steps"]), _cell(row["tokens_per_sec"], ",.0f"),
             metrics.format_duration(wall) if wall is not None else "-", row["status"]]
    lines.append("| " + " | ".join(cells) + " |")
  failed = [row for row in rows if row["error"]]
  if failed:
    lines += ["", "Errors:", ""]
    lines += [f"- `{row['trial']}`: {row['error']}" for row in failed]
  if plots:
    lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  _atomic_write(path, "\n".join(lines) + "\n")


def _by_step(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, one per step: a resumed run's repeated steps keep the last."""
  values = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
  steps = sorted(values)
  return steps, [values[s] for s in steps]


def _save(fig: Any, path: str) -> None:
  import io

  import matplotlib.pyplot as plt
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=110, format="png")
  workdir_lib.write_bytes(path, buf.getvalue())
  plt.close(fig)


def log_axis(values: Sequence[Any]) -> bool:
  """A log x axis for positive numbers spanning more than 10x."""
  numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
  return (len(numbers) == len(values) and bool(numbers) and min(numbers) > 0
          and max(numbers) / min(numbers) > 10)


def write_plots(workdir: str, rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
  """Final val loss vs each swept key, and every trial's loss curves; returns file names."""
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display needed.
  import matplotlib.pyplot as plt

  written = []
  scored = [r for r in rows if r["final_val_loss"] is not None and r["status"] in
            ("done", "pruned")]
  for key in keys:
    points = [r for r in scored if key in r["overrides"]]
    if not points:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [r["overrides"][key] for r in points]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    categories = sorted({str(v) for v in values})

    def x_of(v, numeric=numeric, categories=categories):
      return v if numeric else categories.index(str(v))

    # One line per combination of the other swept values: a product reads as a family.
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in points:
      label = ", ".join(f"{k}={_short(v)}" for k, v in r["overrides"].items() if k != key)
      groups.setdefault(label, []).append(r)
    for label, members in sorted(groups.items()):
      members.sort(key=lambda r: x_of(r["overrides"][key]))
      xs = [x_of(r["overrides"][key]) for r in members]
      ys = [r["final_val_loss"] for r in members]
      line, = ax.plot(xs, ys, marker="o", label=label or None)
      pruned = [(x, y) for x, y, r in zip(xs, ys, members, strict=True) if r["status"] == "pruned"]
      if pruned:
        ax.plot(*zip(*pruned, strict=True), "x", color="gray", markersize=9,
                label="pruned" if label == sorted(groups)[0] else None)
    if log_axis(values):
      ax.set_xscale("log")
    if not numeric:
      ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(key)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"validation loss vs {key}")
    ax.grid(True, alpha=0.3)
    if len(groups) > 1 or any(r["status"] == "pruned" for r in points):
      ax.legend(fontsize=7)
    name = f"val_loss_vs_{key}.png"
    _save(fig, os.path.join(workdir, name))
    written.append(name)

  curves = [r for r in rows if any(METRIC in rec or "train/loss" in rec for rec in r["records"])]
  if curves:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(curves):
      color = f"C{i % 10}"
      steps, vals = _by_step(r["records"], METRIC)
      ax.plot(steps, vals, color=color, marker=".", label=f"{r['trial']} ({r['status']})")
      steps, losses = _by_step(r["records"], "train/loss")
      ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("validation loss (lines with dots) and training loss (faint)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, os.path.join(workdir, "loss_curves.png"))
    written.append("loss_curves.png")
  return written
