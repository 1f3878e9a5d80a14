"""What several `jaxlm` commands share: the --config, --workdir and --step flags, parsing one
command's flags with bad input as one line, and the `jaxlm <command> --help` text.

Every command module owns a `flags.FlagValues()` of its own (not absl's global FLAGS), so a
command accepts only its flags. The shared flags are defined into each command's FlagValues by
the `define_*` helpers here; `prepare` adds what every command takes (help, and absl's logging
and debugging flags, borrowed from the global FLAGS so absl.logging still sees their values).
"""

from __future__ import annotations

import os
import sys
import textwrap

from absl import flags
from ml_collections import config_flags

from jaxlm.errors import JaxlmError

# absl's own help flags print the main module's docstring (and exit 1); each command has its
# own --help instead. --only_check_flags is a flag-definition check for absl's developers.
_ABSL_HELP = ("help", "helpshort", "helpfull", "helpxml", "only_check_flags")
_WIDTH = 100
_NAME_COLUMN = 28


def define_config(fv: flags.FlagValues) -> flags.FlagHolder:
  # Locked: a misspelt --config.K=V override is an error instead of a new, unused key.
  return config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (a Python file with get_config()); override any "
      "key with --config.section.key=value.", flag_values=fv, lock_config=True)


def define_workdir(fv: flags.FlagValues) -> flags.FlagHolder:
  return flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.",
                             flag_values=fv)


def define_step(fv: flags.FlagValues) -> flags.FlagHolder:
  return flags.DEFINE_string("step", None, "Checkpoint to load: a step number, 'latest' (the "
                             "default) or 'best' (lowest validation loss).", flag_values=fv)


def require(flag_value, name: str) -> None:
  if flag_value is None:
    raise JaxlmError(f"--{name} is required")


def parse_step(value: str | None) -> int | str | None:
  """The --step flag as load_run takes it: None, 'latest', 'best' or a step number."""
  if value is None or value in ("latest", "best"):
    return value
  try:
    return int(value)
  except ValueError:
    raise JaxlmError(f"--step must be a number, 'latest' or 'best', got {value!r}") from None


class _HelpFlag(flags.BooleanFlag):
  """--help / -h: prints the command's usage and flags and exits 0 as soon as it is parsed
  (like absl's own --help, so flags after it, even bad ones, do not matter)."""

  def __init__(self, name: str, short_name: str | None, usage: str, full: bool):
    help_string = "also list absl's flags" if full else "show this help"
    super().__init__(name, False, help_string, short_name=short_name)
    self._usage, self._full = usage, full
    self.flag_values: flags.FlagValues | None = None

  def parse(self, argument) -> None:
    if self._parse(argument):
      sys.stdout.write(help_text(self._usage, self.flag_values, full=self._full))
      sys.stdout.flush()
      sys.exit(0)


def prepare(fv: flags.FlagValues, usage: str) -> None:
  """Adds --help/-h, --helpfull and absl's global flags (--verbosity/-v, --logtostderr, ...) to
  one command's FlagValues, right before it parses."""
  for name, full, short in (("help", False, "h"), ("helpshort", False, "?"),
                            ("helpfull", True, None)):
    flag = _HelpFlag(name, short, usage, full)
    flag.flag_values = fv
    fv[name] = flag
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    # The same Flag object in both: a value parsed here is the one absl.logging reads.
    if name == flag.name and name not in _ABSL_HELP and name not in fv:
      fv[name] = flag


def _is_absl(fv: flags.FlagValues, name: str) -> bool:
  return name in flags.FLAGS and flags.FLAGS[name] is fv[name]


def own_flags(fv: flags.FlagValues) -> list[flags.Flag]:
  """The command's flags in the order they were defined: none of absl's, no help flags and no
  --config.K overrides (those are defined while --config is parsed)."""
  return [fv[name] for name in fv
          if fv[name].name == name and "." not in name and not isinstance(fv[name], _HelpFlag)
          and not _is_absl(fv, name)]


def _metavar(flag: flags.Flag) -> str:
  enum_values = getattr(flag.parser, "enum_values", None)
  if enum_values:
    return "{" + ",".join(enum_values) + "}"
  return {"int": "N", "float": "X", "config object": "FILE",
          "comma separated list of strings": "A,B,..."}.get(flag.flag_type(), "VALUE")


def _describe(flag: flags.Flag) -> str:
  """One flag as a help line: its spelling, help text and default, wrapped to 100 columns."""
  if isinstance(flag, _HelpFlag):
    spec = f"--{flag.name}"
  elif flag.boolean:
    spec = f"--[no]{flag.name}"
  else:
    spec = f"--{flag.name}={_metavar(flag)}"
  if flag.short_name:
    spec += f", -{flag.short_name}"
  text = flag.help
  if flag.boolean and flag.default:
    text += " (default: true)"
  elif not flag.boolean and flag.default not in (None, "", []):
    text += f" (default: {flag.default})"
  indent = " " * _NAME_COLUMN
  first = f"  {spec}".ljust(_NAME_COLUMN)
  if len(first) > _NAME_COLUMN:  # A long spelling gets a line of its own.
    return f"  {spec}\n" + textwrap.fill(text, _WIDTH, initial_indent=indent,
                                          subsequent_indent=indent) + "\n"
  return textwrap.fill(text, _WIDTH, initial_indent=first, subsequent_indent=indent) + "\n"


def help_text(usage: str, fv: flags.FlagValues, full: bool = False) -> str:
  """`jaxlm <command> --help`: the usage lines, then the command's own flags."""
  out = [usage.rstrip("\n") + "\n", "\nflags:\n"]
  out += [_describe(flag) for flag in own_flags(fv)]
  out.append(_describe(fv["help"]))
  if full:
    out.append("\nabsl flags (logging and debugging):\n")
    out += [_describe(fv[name]) for name in fv if fv[name].name == name and _is_absl(fv, name)]
  else:
    out.append(textwrap.fill(
        "absl's logging flags work too (--verbosity/-v N, --logtostderr, --log_dir DIR, ...): "
        "--helpfull lists them.", _WIDTH, initial_indent="\n", subsequent_indent="") + "\n")
  return "".join(out)


def parse_flags(fv: flags.FlagValues, argv: list[str]) -> list[str]:
  """Parses argv into one command's flags, with bad input (a bad value, an unknown config key,
  a config file that fails to load) as a JaxlmError of one line. An unknown flag is left to the
  caller as flags.UnrecognizedFlagError: only the dispatcher knows every command's flags."""
  try:
    return fv(argv)
  except flags.UnrecognizedFlagError:
    raise
  except flags.Error as e:
    msg = _flag_error(str(e))
  except (KeyError, AttributeError) as e:
    # ml_collections reports an unknown override key as KeyError('key\nDid you mean ...?');
    # the same types come from the config file itself (no get_config, a misspelt key there).
    text = str(e.args[0] if e.args else e)
    text = text.replace("\\n", "\n").replace('\\"', '"').replace("\\'", "'")
    lines = [line.strip("'\" ") for line in text.splitlines()] or [""]
    key, hint = lines[0], (lines[1] if len(lines) > 1 else "")
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=")[0].split(".")), None)
    if flag:
      msg = f"unknown config key {flag}" + (f" ({hint})" if hint else "")
    elif "has no attribute 'get_config'" in text:
      msg = (f"config file {_config_path(argv)!r} has no get_config(): define get_config() "
             "returning the experiment's ml_collections.ConfigDict")
    else:
      msg = (f"cannot load the config file {_config_path(argv)!r}: {type(e).__name__}: {key}"
             + (f" ({hint})" if hint else ""))
  except Exception as e:  # noqa: BLE001  (raised inside the user's config file while loading it)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = f"cannot load the config file {_config_path(argv)!r}: {type(e).__name__}: {first}"
  raise JaxlmError(msg)


def _config_path(argv: list[str]) -> str:
  """The --config file named in argv (its value, without a ':ARGS' suffix)."""
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
    if a.startswith("--config="):
      return a[len("--config="):].split(":")[0]
  return "?"


def _flag_error(text: str) -> str:
  """absl's message for a bad flag value; for a config file whose get_config() raised, it holds
  the traceback, whose last line names the exception (the first says only "Error whilst")."""
  lines = [line for line in text.strip().splitlines() if line.strip()]
  if not lines:
    return "bad flag value"
  if "Error whilst parsing config file" in lines[0] and len(lines) > 1:
    flag = lines[0].split(": Error whilst")[0].removeprefix("flag --config=")
    return f"cannot load the config file {flag!r}: get_config() raised {lines[-1].strip()}"
  return lines[0]


def load_config(fv: flags.FlagValues) -> None:
  """Loads --config now (config_flags loads lazily), so a bad file is one line, not a traceback."""
  try:
    config = fv["config"].value
    if config is not None:
      config.keys()  # A file that failed to load stands in as an object that raises on use.
  except Exception as e:  # noqa: BLE001  (any failure inside the user's config file)
    path = config_flags.get_config_filename(fv["config"])
    if isinstance(e, AttributeError) and "'keys'" in str(e):
      raise JaxlmError(f"get_config() in {path!r} returned {type(config).__name__}, not an "
                       "ml_collections.ConfigDict") from None
    if not os.path.exists(path):
      raise JaxlmError(f"config file not found: {path!r}") from None
    cause = e.__cause__ or e
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    raise JaxlmError(f"cannot load config file {path!r}: {first}") from None
