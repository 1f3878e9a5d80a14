"""`jaxlm train`: train a model from a config file, or resume the run in --workdir."""

from __future__ import annotations

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
  common.require(_CONFIG.value, "config")
  common.require(_WORKDIR.value, "workdir")
  # Imported here so that `jaxlm train --help` does not load jax.
  from jaxlm import host
  host.prepare_process(_CONFIG.value)
  import jax

  from jaxlm import config as config_lib
  from jaxlm import lock, train
  config_lib.validate_config(_CONFIG.value)  # A bad config leaves no workdir behind.
  # One run per workdir (see lock.py); process 0 speaks for a multi-process run.
  with lock.WorkdirLock(_WORKDIR.value, enabled=jax.process_index() == 0):
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
