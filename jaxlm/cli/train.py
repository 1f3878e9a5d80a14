"""`jaxlm train`: train a model from a config file, or resume the run in --workdir."""

from __future__ import annotations

import sys

from absl import flags

from jaxlm.cli import common

USAGE = """\
usage: jaxlm train --config FILE --workdir DIR [--config.KEY=VALUE ...]

Trains a model, or resumes it from the latest checkpoint in --workdir, e.g.
  jaxlm train --config configs/shakespeare_char.py --workdir runs/sc
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_CONFIG = common.define_config(FLAGS)
_WORKDIR = common.define_workdir(FLAGS)


def main(argv: list[str]) -> None:
  del argv
  from jaxlm import phases
  clock = phases.Phases(start=phases.process_start())  # From jaxlm's first import on.
  common.require(_CONFIG.value, "config")
  common.require(_WORKDIR.value, "workdir")
  # Imported here so that `jaxlm train --help` does not load jax.
  from jaxlm import host
  host.prepare_process(_CONFIG.value)
  import jax

  from jaxlm import config as config_lib
  from jaxlm import lock, train
  from jaxlm import workdir as workdir_lib
  config_lib.validate_config(_CONFIG.value)  # A bad config leaves no workdir behind.
  from jaxlm import checkpoint as checkpoint_lib
  # A save's failed write (a full disk) leaves its sibling writes to fail after the run has
  # named it: their asyncio and tensorstore reports would be tracebacks after the one line.
  checkpoint_lib.quiet_pending_io()
  previous = sys.excepthook, sys.unraisablehook
  sys.excepthook = _quiet_failed_saves(previous[0])
  sys.unraisablehook = _quiet_failed_saves(previous[1])
  try:
    # One run per workdir (see lock.py); process 0 speaks for a multi-process run.
    with lock.WorkdirLock(_WORKDIR.value, enabled=jax.process_index() == 0):
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, clock)
  except OSError as e:
    if e.errno not in workdir_lib.DISK_FULL:
      raise
    raise disk_full(e, _WORKDIR.value) from None
  finally:
    sys.excepthook, sys.unraisablehook = previous


def _quiet_failed_saves(previous):
  """When one write of an orbax save fails (a full disk), it closes the save's event loop and
  tensorstore's callbacks for the others print "Event loop is closed" tracebacks through
  sys.excepthook; the failure itself reaches the run (as OSError) and ends it in one line."""
  def hook(*args):
    value = args[0].exc_value if len(args) == 1 else args[1]  # unraisablehook: one argument.
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(*args)
  return hook


def disk_full(e: OSError, workdir: str) -> Exception:
  """The one line a full disk ends a run with: the file that failed, and what the workdir
  keeps (every checkpoint that finished; a half-written one is never listed or restored)."""
  from jaxlm import workdir as workdir_lib
  from jaxlm.errors import JaxlmError
  ckpts = workdir_lib.path(workdir) / "checkpoints"
  try:
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  except OSError:
    steps = []
  kept = (f"kept: the checkpoints at steps {', '.join(map(str, steps))} (a rerun resumes from "
          f"step {steps[-1]})" if steps else "no checkpoint was kept")
  where = e.filename or f"in {workdir}"  # Some writers (tensorstore's) name no file.
  error = JaxlmError(f"{e.strerror} writing {where}: the run stopped; {kept}, and every "
                     "record written before; free some space and run the same command")
  error.exit_now = True  # Orbax's unfinished writes would print tracebacks at exit.
  return error
