"""Dotted overrides: applying {"optim.lr": 3e-4} to a locked config, and naming trials after them.

A trial is its overrides: `resolve` gives its config, `trial_name` its directory name and
`flag_value` the text of each `--config.KEY=VALUE` flag of its `jaxlm train` command.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from typing import Any

import ml_collections

from jaxlm.errors import JaxlmError
from jaxlm.sweep.space import Trial


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


def short(value: Any) -> str:
  """`value` as trial names, tables and plot legends show it (floats to 6 digits)."""
  return f"{value:.6g}" if isinstance(value, float) else str(value)


def trial_name(overrides: Trial) -> str:
  """A readable directory name: 'optim.lr=0.0003,model.n_layer=6' ('defaults' if empty)."""
  if not overrides:
    return "defaults"
  name = ",".join(f"{k}={short(v)}" for k, v in overrides.items())
  name = name.replace("/", "_").replace("\0", "")  # A path in a value must not nest directories.
  if len(name) > 120:  # File systems cap names at 255 bytes; keep them short and still unique.
    name = name[:100] + "-" + digest(overrides)
  return name


def digest(overrides: Trial) -> str:
  """8 hex digits that tell apart any two different sets of overrides."""
  return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def flag_value(value: Any) -> str:
  """`value` as ml_collections' config flags parse it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)  # Round-trips exactly.
  return str(value)
