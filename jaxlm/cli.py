"""The `jaxlm` console script: `jaxlm <command> --config FILE --workdir DIR [--config.K=V ...]`.

Commands: train, eval, sweep. Each command parses flags, hands the locked config to the library and
prints bad input as one line (`jaxlm: error: ...`) instead of a traceback.
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.errors import JaxlmError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()); override any "
    "key with --config.section.key=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_STEP = flags.DEFINE_string("step", None, "Checkpoint to load: a step number, 'latest' (the "
                            "default) or 'best' (lowest validation loss).")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "Batches to evaluate (default: the run's "
                                   "train.eval_steps).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "sweep: trials to run at once.")
_SUMMARIZE = flags.DEFINE_bool("summarize", False, "sweep: only rebuild results.csv, results.md "
                               "and the plots from the trial directories in --workdir.")
_WORKER = flags.DEFINE_bool("worker", False, "sweep: run trials of an adaptive search as one of "
                            "several workers sharing its study; leaves the summary to --summarize.")
_STORAGE = flags.DEFINE_string("storage", None, "sweep: Optuna storage URL of the study, e.g. "
                               "postgresql://host/db (default: sqlite in --workdir).")
_N_TRIALS = flags.DEFINE_integer("n_trials", None, "sweep: trials of an adaptive search (default: "
                                 "the sweep file's N_TRIALS).")

USAGE = """usage: jaxlm <command> [flags]

commands:
  train   train a model, or resume it:
            jaxlm train --config configs/shakespeare_char.py --workdir runs/sc
  eval    evaluate a checkpoint:  jaxlm eval --workdir runs/sc [--step N|best]
  sweep   run (or resume) a sweep, one `jaxlm train` per trial, then a table and plots:
            jaxlm sweep --config configs/sweeps/shakespeare_lr.py --workdir runs/lr [--parallel N]
          adaptive search workers sharing one study: add --worker [--storage URL] [--n_trials N]
          rebuild the table and plots:  jaxlm sweep --summarize --workdir runs/lr
"""


def _require(flag_value, name: str) -> None:
  if flag_value is None:
    raise JaxlmError(f"--{name} is required")


def cmd_train(argv: list[str]) -> None:
  del argv
  _require(_CONFIG.value, "config")
  _require(_WORKDIR.value, "workdir")
  from jaxlm import train  # Imported here so that `jaxlm --help` does not load jax.
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _step_flag() -> int | str | None:
  value = _STEP.value
  if value is None or value in ("latest", "best"):
    return value
  try:
    return int(value)
  except ValueError:
    raise JaxlmError(f"--step must be a number, 'latest' or 'best', got {value!r}") from None


def cmd_eval(argv: list[str]) -> None:
  del argv
  _require(_WORKDIR.value, "workdir")
  from jaxlm import train
  result = train.evaluate_run(_WORKDIR.value, step=_step_flag(), eval_steps=_EVAL_STEPS.value)
  print(f"step {result['step']} | val loss {result['val/loss']:.4f} | val perplexity "
        f"{result['val/perplexity']:.3f} | val bits/token {result['val/bits_per_token']:.4f} | "
        f"{result['tokens']:,} tokens")


def cmd_sweep(argv: list[str]) -> None:
  del argv
  _require(_WORKDIR.value, "workdir")
  from jaxlm import sweep
  if _SUMMARIZE.value:
    sweep.summarize(_WORKDIR.value)
    return
  _require(_CONFIG.value, "config")
  config_flag = flags.FLAGS["config"]
  plan = sweep.prepare(config_flags.get_config_filename(config_flag), _CONFIG.value,
                       config_flags.get_override_values(config_flag), n_trials=_N_TRIALS.value)
  sweep.run(plan, _WORKDIR.value, parallel=_PARALLEL.value, worker=_WORKER.value,
            storage=_STORAGE.value)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sweep": cmd_sweep}


class _QuietLibraries(py_logging.Filter):
  """Hides orbax's per-save bookkeeping and JAX's backend probing unless --verbosity >= 1."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR or logging.get_verbosity() >= 1:
      return True
    path = record.pathname.replace("\\", "/")
    return "/orbax/" not in path and not path.endswith("xla_bridge.py")


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = f"unknown command {argv[1]!r}\n" if len(argv) > 1 else ""
    sys.stderr.write(got + USAGE)
    sys.exit(2)
  for handler in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_QuietLibraries())
  try:
    COMMANDS[argv[1]](argv[2:])
  except JaxlmError as e:
    logging.flush()
    sys.stderr.write(f"jaxlm: error: {e}\n")
    sys.exit(2)
  except KeyboardInterrupt:
    sys.stderr.write("jaxlm: aborted\n")
    sys.exit(130)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config errors (unknown key, bad value) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
  except (KeyError, AttributeError) as e:
    # ml_collections reports an unknown override key as KeyError('key\nDid you mean ...?').
    text = str(e.args[0] if e.args else e)
    text = text.replace("\\n", "\n").replace('\\"', '"').replace("\\'", "'")
    lines = [line.strip("'\" ") for line in text.splitlines()] or [""]
    key, hint = lines[0], (lines[1] if len(lines) > 1 else "")
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=")[0].split(".")), key)
    msg = f"unknown config key {flag}" + (f" ({hint})" if hint else "")
  sys.stderr.write(f"jaxlm: error: {msg}\n")
  sys.exit(2)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
