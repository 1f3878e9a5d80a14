"""`jaxlm sweep`: run (or resume) a sweep, one `jaxlm train` per trial, then a table and plots."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from jaxlm.cli import common

USAGE = """\
usage: jaxlm sweep --config SWEEP_FILE --workdir DIR [--parallel N] [--config.KEY=VALUE ...]
       jaxlm sweep --config SWEEP_FILE --workdir DIR --worker [--storage URL] [--n_trials N]
       jaxlm sweep --summarize --workdir DIR

Runs (or resumes) the trials of a sweep file, each a `jaxlm train` in a directory of --workdir,
then writes results.csv, results.md and plots, e.g.
  jaxlm sweep --config configs/sweeps/shakespeare_lr.py --workdir runs/lr --parallel 2
Adaptive searches (Optuna) can run as several --worker processes sharing one study. A sweep
file with get_ladder() is a scaling ladder: its summary fits L(N) = E + A / N^alpha, e.g.
  jaxlm sweep --config configs/sweeps/shakespeare_ladder.py --workdir runs/ladder --parallel 2
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_CONFIG = common.define_config(FLAGS)
_WORKDIR = common.define_workdir(FLAGS)
_PARALLEL = flags.DEFINE_integer("parallel", 1, "sweep: trials to run at once.", flag_values=FLAGS)
_SUMMARIZE = flags.DEFINE_bool("summarize", False, "sweep: only rebuild results.csv, results.md "
                               "and the plots from the trial directories in --workdir.",
                               flag_values=FLAGS)
_WORKER = flags.DEFINE_bool("worker", False, "sweep: run trials of an adaptive search as one of "
                            "several workers sharing its study; leaves the summary to --summarize.",
                            flag_values=FLAGS)
_STORAGE = flags.DEFINE_string("storage", None, "sweep: Optuna storage URL of the study, e.g. "
                               "postgresql://host/db (default: sqlite in --workdir).",
                               flag_values=FLAGS)
_N_TRIALS = flags.DEFINE_integer("n_trials", None, "sweep: trials of an adaptive search (default: "
                                 "the sweep file's N_TRIALS).", flag_values=FLAGS)


def main(argv: list[str]) -> None:
  del argv
  common.require(_WORKDIR.value, "workdir")
  from jaxlm import sweep
  if _SUMMARIZE.value:
    sweep.summarize(_WORKDIR.value)
    return
  common.require(_CONFIG.value, "config")
  config_flag = FLAGS["config"]
  # The sweep hands the file name and the --config.K=V overrides on to every trial.
  plan = sweep.prepare(config_flags.get_config_filename(config_flag), _CONFIG.value,
                       config_flags.get_override_values(config_flag), n_trials=_N_TRIALS.value)
  sweep.run(plan, _WORKDIR.value, parallel=_PARALLEL.value, worker=_WORKER.value,
            storage=_STORAGE.value)
