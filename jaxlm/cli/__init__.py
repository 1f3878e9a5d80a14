"""The `jaxlm` console script: `jaxlm <command> [flags]`, one module per command in jaxlm/cli/.

Commands: train, prepare, eval, sample, sweep, bench, params, convert, launch, tpu. Each command
module owns its flags (a FlagValues of its own, not absl's global FLAGS) and its `main`; this module
picks the command, parses argv into that command's flags only, and prints bad input as one line
(`jaxlm: error: ...`, exit 2) instead of a traceback. No command module imports jax at import
time, so `jaxlm --help` and `jaxlm <command> --help` are quick.
"""

from __future__ import annotations

import difflib
import importlib
import logging as py_logging
import os
import re
import sys
from types import ModuleType
from typing import NoReturn

from absl import app, flags, logging

from jaxlm.cli import common
from jaxlm.errors import JaxlmError

COMMANDS = ("train", "prepare", "eval", "sample", "sweep", "bench", "params", "convert", "launch",
            "tpu")

USAGE = """usage: jaxlm <command> [flags]

commands:
  prepare tokenize a config's data.sources into its token store, with progress (train does it
          too when the store is missing):  jaxlm prepare --config configs/fineweb_like.py
  train   train a model, or resume it:
            jaxlm train --config configs/shakespeare_char.py --workdir runs/sc
  eval    evaluate a checkpoint:  jaxlm eval --workdir runs/sc [--step N|best]
  sample  generate text from a trained run:
            jaxlm sample --workdir runs/sc --prompt "ROMEO:" --temperature 0.8 --top_k 40 \\
                --top_p 0.95 [--max_new_tokens N] [--num_samples N] [--seed N] [--step N|best]
                [--prompt_file F]
  sweep   run (or resume) a sweep, one `jaxlm train` per trial, then a table and plots:
            jaxlm sweep --config configs/sweeps/shakespeare_lr.py --workdir runs/lr [--parallel N]
          adaptive search workers sharing one study: add --worker [--storage URL] [--n_trials N]
          rebuild the table and plots:  jaxlm sweep --summarize --workdir runs/lr
  bench   time the train step, tokens/s and MFU:  jaxlm bench --config C [--steps 20]
          [--profile DIR] [--nosampling]
  params  what the parameters are, what they cost, whether a config fits (nothing allocated):
            jaxlm params --config configs/gpt2_small.py [--device "TPU v4"] [--format json]
          and, for a trained run, how far each tensor moved from its random init:
            jaxlm params --workdir runs/sc [--step N|best] [--plot drift.png]
  convert Hugging Face GPT-2 / LLaMA checkpoints (safetensors) to a jaxlm workdir and back:
            jaxlm convert --from_hf DIR --workdir W
            jaxlm convert --to_hf --workdir W --out DIR
  launch  run a command as N processes of one JAX cluster on this machine:
            jaxlm launch --num_processes 2 --devices_per_process 2 -- train --config C --workdir W
  tpu     Cloud TPU VMs: up, run, logs, stop, down, watch (relaunches when preempted):
            jaxlm tpu watch --tpu_name lm1 --tpu_zone us-central2-b --tpu_accelerator v4-8 \\
              --tpu_spot -- train --config configs/shakespeare_char.py --workdir gs://B/sc

jaxlm <command> --help lists the flags of that command.
"""

_HELP = ("-h", "--help", "-help", "-?", "--helpshort", "--helpfull", "help")


def command_module(name: str) -> ModuleType:
  """jaxlm/cli/<name>.py: its USAGE, FLAGS (a FlagValues) and main(argv)."""
  return importlib.import_module(f"jaxlm.cli.{name}")


def _fail(message: str, usage: bool = False) -> NoReturn:
  sys.stderr.write(f"jaxlm: error: {message}\n" + (USAGE if usage else ""))
  sys.exit(2)


def _owners(name: str) -> list[str]:
  """The commands that define flag `name`; --noNAME counts for a boolean NAME and
  --config.KEY for --config."""
  base = name.split(".", 1)[0]
  owners = []
  for command in COMMANDS:
    fv = command_module(command).FLAGS
    if base in fv or (base.startswith("no") and base[2:] in fv and fv[base[2:]].boolean):
      owners.append(command)
  return owners


def _unknown_flag(command: str, error: flags.UnrecognizedFlagError) -> str:
  """The one-line error for a flag `jaxlm COMMAND` does not define."""
  name = error.flagname
  owners = _owners(name)
  if command in owners:  # Only a --config.KEY=VALUE with no --config to override.
    return f"--{name} overrides a config key: give --config FILE before it"
  if owners:
    quoted = [f"'jaxlm {owner}'" for owner in owners]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    hint = getattr(command_module(command), "CHILD_HINT", "")
    return (f"--{name} is a flag of {listed}, not of 'jaxlm {command}'" +
            (f" ({hint})" if hint else ""))
  # absl puts its did-you-mean in the message only: "... Did you mean: a, b ?".
  match = re.search(r"Did you mean: (.+) \?$", str(error))
  guesses = ", ".join(f"--{g.strip()}" for g in match.group(1).split(",")) if match else ""
  return (f"unknown flag --{name}" + (f" (did you mean {guesses}?)" if guesses else "") +
          f"; jaxlm {command} --help lists its flags")


def _parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: argv[1] is the command, and only its flags are parsed."""
  if len(argv) > 1 and argv[1] in _HELP:
    sys.stdout.write(USAGE)
    sys.exit(0)
  if len(argv) < 2:
    sys.stderr.write(USAGE)
    sys.exit(2)
  command = argv[1]
  if command.startswith("-"):
    _fail(f"the command comes first: jaxlm <command> [flags], got {command!r} first", usage=True)
  if command not in COMMANDS:
    close = difflib.get_close_matches(command, COMMANDS, n=1)
    sys.stderr.write(f"unknown command {command!r}" +
                     (f" (did you mean {close[0]}?)" if close else "") + "\n" + USAGE)
    sys.exit(2)
  module = command_module(command)
  common.prepare(module.FLAGS, module.USAGE)
  try:
    rest = common.parse_flags(module.FLAGS, [argv[0], *argv[2:]])
  except flags.UnrecognizedFlagError as e:
    _fail(_unknown_flag(command, e))
  except JaxlmError as e:
    _fail(str(e))
  if rest[1:] and not hasattr(module, "CHILD_HINT"):  # Only launch and tpu take arguments.
    _fail(f"unexpected argument {rest[1]!r}: jaxlm {command} takes flags only "
          f"(jaxlm {command} --help lists them)")
  # app.run and absl.logging read their flags from the global FLAGS, which must say "parsed";
  # the values are there already (prepare() shares those Flag objects with the command).
  flags.FLAGS.mark_as_parsed()
  return [argv[0], command, *rest[1:]]


class _QuietLibraries(py_logging.Filter):
  """Hides orbax's per-save bookkeeping and JAX's backend probing unless --verbosity >= 1."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if logging.get_verbosity() >= 1:
      return True
    path = record.pathname.replace("\\", "/")
    if record.levelno >= py_logging.ERROR:
      # A full disk fails each of a save's writes, and orbax logs each with its traceback;
      # the run reports it once, as a one-line error naming the file.
      text = record.getMessage() + str(record.exc_info[1] if record.exc_info else "")
      return not ("/orbax/" in path and ("RESOURCE_EXHAUSTED" in text or
                                         "No space left" in text))
    return "/orbax/" not in path and not path.endswith("xla_bridge.py")


def main(argv: list[str]) -> None:
  """Runs the command _parse_flags chose: argv is [program, command, *positional args]."""
  command = command_module(argv[1])
  for handler in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_QuietLibraries())
  try:
    if "config" in command.FLAGS:
      common.load_config(command.FLAGS)
    command.main(argv[2:])
  except JaxlmError as e:
    logging.flush()
    sys.stderr.write(f"jaxlm: error: {e}\n")
    if getattr(e, "exit_now", False):  # Skips the teardown of threads that would print more.
      sys.stderr.flush()
      sys.stdout.flush()
      os._exit(2)
    sys.exit(2)
  except KeyboardInterrupt:
    sys.stderr.write("jaxlm: aborted\n")
    sys.exit(130)


def run() -> None:
  """The console script (setup.cfg: jaxlm = jaxlm.cli:run) and `python -m jaxlm.cli`."""
  # app.run sets up absl logging (to stderr, INFO unless --verbosity), --pdb and --only_check_args
  # around our parser and main, as it did when all flags were global.
  app.run(main, flags_parser=_parse_flags)
