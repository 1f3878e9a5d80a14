"""Hyperparameter sweeps: trials from a sweep file, each run as a `jaxlm train` process, summarised.

A sweep file is a config file (`get_config()`) plus either `get_sweep()`, returning a list of
trials, each a dict of dotted overrides ({"optim.lr": 3e-4}), or `get_search_space()`,
returning ranges for an adaptive Optuna search ({"optim.lr": ("log_uniform", 1e-4, 3e-3)})
with `N_TRIALS` (and optionally `SAMPLER` = "tpe" | "random", `PRUNER` = "median" | "none"), or
`get_ladder()`, returning `ladder({name: {overrides}}, steps=|tokens=|flops=[budgets])`: a
scaling ladder of model sizes, whose summary fits L(N) = E + A / N^alpha (see ladders.py).

Layout of a sweep workdir W: one directory per trial (named after its overrides) holding the
trial's own run (config.json, metrics.jsonl, checkpoints/), its log `train.log` and its sweep
state `trial.json`; then results.csv, results.md and PNG plots, rebuilt from those alone.
Running the same sweep again skips finished trials, resumes interrupted ones from their
checkpoints and tries failed ones again (except those whose values validate_config rejects).

The package, one job per module (each imports only those above it):
  space      the sweep-file helpers: axis, product, zipped, ranges, sample
  overrides  dotted overrides: resolve, trial names, flag values
  ladders    scaling ladders: sizes x budgets as trials, and each size's N
  plan       loading a sweep file and checking its trials: Sweep, prepare
  state      the files of a sweep: trial.json, metrics.jsonl, train.log, sweep.json
  scaling    the fits: power laws with uncertainties, IsoFLOP parabolas (numpy, scipy)
  report     results.csv, results.md and plots (summarize)
  ladder_report  a ladder's fits, table and plots in the summary (imported by report, lazily)
  pool       running N trial processes at a time: locks, signals, progress
  search     adaptive search with Optuna (run_search)
  grid       `run`: a grid sweep, or an adaptive search handed to `search`
This file re-exports their public names (`from jaxlm import sweep; sweep.axis(...)`). Importing
it is cheap (no jax, optuna or matplotlib), since every sweep file does.
"""

from jaxlm.sweep.grid import run
from jaxlm.sweep.ladders import BUDGET_KINDS, Ladder, ladder, size_counts
from jaxlm.sweep.overrides import flag_value, flatten, resolve, set_override, trial_name
from jaxlm.sweep.plan import (
  PRUNERS,
  SAMPLERS,
  Sweep,
  TrialSpec,
  check_space,
  check_trial,
  load_experiment,
  load_module,
  plan_trials,
  prepare,
  train_command,
)
from jaxlm.sweep.pool import Progress, Running, finish_trial, run_pool, start_trial
from jaxlm.sweep.report import CSV_COLUMNS, collect, log_axis, summarize, swept_keys, write_plots
from jaxlm.sweep.scaling import Fit, fit_line_loglog, fit_parabola, fit_power_law
from jaxlm.sweep.search import import_optuna, open_study, run_search
from jaxlm.sweep.space import (
  RANGE_KINDS,
  Range,
  Trial,
  axis,
  check_range,
  choice,
  integer,
  log_uniform,
  product,
  sample,
  uniform,
  zipped,
)
from jaxlm.sweep.state import (
  LOG_FILE,
  METRIC,
  STATE_FILE,
  MetricsTail,
  error_line,
  is_finished,
  read_metrics,
  read_state,
  write_state,
)

__all__ = [
  # space
  "RANGE_KINDS", "Range", "Trial", "axis", "check_range", "choice", "integer", "log_uniform",
  "product", "sample", "uniform", "zipped",
  # overrides
  "flag_value", "flatten", "resolve", "set_override", "trial_name",
  # ladders
  "BUDGET_KINDS", "Ladder", "ladder", "size_counts",
  # scaling
  "Fit", "fit_line_loglog", "fit_parabola", "fit_power_law",
  # plan
  "PRUNERS", "SAMPLERS", "Sweep", "TrialSpec", "check_space", "check_trial", "load_experiment",
  "load_module", "plan_trials", "prepare", "train_command",
  # state
  "LOG_FILE", "METRIC", "STATE_FILE", "MetricsTail", "error_line", "is_finished", "read_metrics",
  "read_state", "write_state",
  # report
  "CSV_COLUMNS", "collect", "log_axis", "summarize", "swept_keys", "write_plots",
  # pool
  "Progress", "Running", "finish_trial", "run_pool", "start_trial",
  # search
  "import_optuna", "open_study", "run_search",
  # grid
  "run",
]
