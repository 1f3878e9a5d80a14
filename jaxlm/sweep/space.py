"""The sweep-file language: building a grid of trials and ranges for random or adaptive search.

Every sweep file imports this (through `from jaxlm import sweep`), so it stays cheap: numpy and
nothing of jax, optuna or matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlm.errors import JaxlmError

Trial = dict[str, Any]  # Dotted config key -> value, e.g. {"optim.lr": 3e-4, "model.n_layer": 6}.
Range = tuple  # ("uniform"|"log_uniform"|"int", low, high) or ("choice", [values]).

RANGE_KINDS = ("uniform", "log_uniform", "int", "choice")


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


# ---------------------------------------------------------------------------------------------
# Ranges: for `sample` here and for an adaptive search's get_search_space().
# ---------------------------------------------------------------------------------------------

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
