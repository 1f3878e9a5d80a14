"""Scaling ladders: a sweep over model sizes (and budgets) whose summary fits scaling laws.

A sweep file declares a ladder with `get_ladder()` (instead of get_sweep() or
get_search_space()), returning `sweep.ladder(sizes, ...)`:

  def get_ladder():
    return sweep.ladder({
        "xs": {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2},
        "s": {"model.n_layer": 2, "model.d_model": 64, "model.n_head": 4},
        "m": {"model.n_layer": 4, "model.d_model": 128, "model.n_head": 4},
    }, steps=[500, 1000])

Each size is a name and a dict of overrides (any config keys: a size may set its own lr).
Budgets are optional and of one kind: `steps` (train.steps values), `tokens` (tokens trained,
turned into train.steps at the size's batch and block size) or `flops` (training FLOPs, turned
into train.steps per size from its FLOPs per token: the IsoFLOP design of Chinchilla's approach
2). The trials are every size crossed with every budget (the base config's train.steps when
there are none); they run like a grid sweep's (resumable, N at a time), and sweep.json records
which size and budget each trial is, which is what the summary (jaxlm/sweep/scaling.py) fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from absl import logging

from jaxlm.errors import JaxlmError
from jaxlm.sweep.overrides import resolve
from jaxlm.sweep.space import Trial

BUDGET_KINDS = ("steps", "tokens", "flops")


@dataclasses.dataclass(frozen=True)
class Ladder:
  sizes: dict[str, Trial]
  budget_kind: str | None = None  # One of BUDGET_KINDS, or None: the base config's train.steps.
  budgets: tuple[float, ...] = ()


def _positive_numbers(kind: str, values: Any) -> tuple[float, ...]:
  if not isinstance(values, (list, tuple)) or not values:
    raise JaxlmError(f"ladder {kind}= must be a non-empty list of numbers, got {values!r}")
  for v in values:
    integral = kind == "steps"
    ok = (isinstance(v, int) if integral else isinstance(v, (int, float)))
    if not ok or isinstance(v, bool) or not v > 0:
      what = "positive integers" if integral else "positive numbers"
      raise JaxlmError(f"ladder {kind}= must be {what}, got {v!r} in {list(values)!r}")
  if len(set(values)) != len(values):
    raise JaxlmError(f"ladder {kind}= lists a budget twice: {list(values)!r}")
  return tuple(values)


def ladder(sizes: dict[str, Trial], *, steps: Any = None, tokens: Any = None,
           flops: Any = None) -> Ladder:
  """A ladder of named model sizes, optionally crossed with budgets (see the module doc)."""
  if not isinstance(sizes, dict) or not sizes:
    raise JaxlmError("ladder sizes must be a non-empty dict {name: {config key: value}}, got "
                     f"{sizes!r}")
  for name, overrides in sizes.items():
    if not isinstance(name, str) or not name:
      raise JaxlmError(f"ladder size names must be non-empty strings, got {name!r}")
    if not isinstance(overrides, dict) or not overrides:
      raise JaxlmError(f"ladder size {name!r}: expected a non-empty dict of overrides such as "
                       f"{{'model.d_model': 64}}, got {overrides!r}")
  seen: dict[str, str] = {}
  for name, overrides in sizes.items():
    key = repr(sorted(overrides.items(), key=lambda kv: str(kv[0])))
    if key in seen:
      raise JaxlmError(f"ladder sizes {seen[key]!r} and {name!r} are the same overrides: "
                       "every size must differ")
    seen[key] = name
  given = {k: v for k, v in (("steps", steps), ("tokens", tokens), ("flops", flops))
           if v is not None}
  if len(given) > 1:
    raise JaxlmError(f"a ladder takes one kind of budget, got {' and '.join(given)}: use "
                     "steps=, tokens= or flops=")
  if not given:
    return Ladder(sizes=dict(sizes))
  (kind, values), = given.items()
  for name, overrides in sizes.items():
    if "train.steps" in overrides:
      raise JaxlmError(f"ladder size {name!r} sets train.steps, but the ladder's {kind}= "
                       "budgets set it: drop one")
  return Ladder(sizes=dict(sizes), budget_kind=kind, budgets=_positive_numbers(kind, values))


def size_counts(cfg: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
  """N of a config as `jaxlm params` counts it: every tensor of the model, from its shapes.

  "total" counts every parameter; "non_embedding" leaves out the token and position tables
  (Kaplan et al.'s N; an untied output head stays in); "matmul" is what FLOPs are counted on.
  """
  import jax  # Lazily: the sweep package stays cheap to import.

  from jaxlm import config as config_lib
  from jaxlm import metrics
  from jaxlm import model as model_lib
  from jaxlm.params import anatomy
  mcfg = config_lib.model_config(cfg, vocab_size)
  model = model_lib.make_model(mcfg)
  abstract = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  rows = anatomy.tensors(abstract)
  total = sum(t.count for t in rows)
  embedding = sum(t.count for t in rows if t.kind == "embedding")
  position = sum(t.count for t in rows if t.layer == model_lib.POSITION_EMBED)
  fpt = metrics.flops_per_token(total - position, mcfg.n_layer, mcfg.d_model, mcfg.block_size,
                                mcfg.layer_windows)
  return {"total": total, "non_embedding": total - embedding, "matmul": total - position,
          "flops_per_token": fpt, "tokens_per_step": cfg.train.batch_size * mcfg.block_size}


def plan(cfg: ml_collections.ConfigDict, lad: Any) -> tuple[list[Trial], list[dict[str, Any]]]:
  """The trials of a ladder and, for each, its size and budget (what sweep.json records)."""
  if not isinstance(lad, Ladder):
    raise JaxlmError("get_ladder() must return sweep.ladder({name: {overrides}}, ...), got "
                     f"{type(lad).__name__}")
  if len(lad.sizes) < 3:  # Not an error: the trials are worth running, only the fit is not made.
    logging.warning("a ladder of %d size(s): its trials run, but fitting L(N) = E + A / N^alpha "
                    "needs at least 3", len(lad.sizes))
  trials, points = [], []
  for name, size in lad.sizes.items():
    try:
      resolved = resolve(cfg, size)
    except JaxlmError as e:
      raise JaxlmError(f"ladder size {name!r}: {e}") from None
    if lad.budget_kind is None:
      trials.append(dict(size))
      points.append({"size": name, "budget": None})
      continue
    per_step = 1.0
    if lad.budget_kind != "steps":
      from jaxlm import config as config_lib  # Imports jax: only for tokens and FLOPs.
      try:
        config_lib.validate_config(resolved)
      except JaxlmError as e:
        raise JaxlmError(f"ladder size {name!r}: {e}") from None
      counts = size_counts(resolved, config_lib.resolve_vocab_size(resolved)[0])
      per_step = counts["tokens_per_step"] * (counts["flops_per_token"]
                                              if lad.budget_kind == "flops" else 1.0)
    for budget in lad.budgets:
      steps = int(round(budget / per_step))
      if steps < 1:
        raise JaxlmError(f"ladder size {name!r}: a budget of {budget:g} {lad.budget_kind} is "
                         f"less than one step ({per_step:.3g} {lad.budget_kind} per step): "
                         "raise it")
      trials.append({**size, "train.steps": steps})
      points.append({"size": name, "budget": budget})
  return trials, points


def record(lad: Ladder, points: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
  """The ladder as sweep.json keeps it: sizes, budgets and each trial's (size, budget)."""
  return {"sizes": lad.sizes, "budget_kind": lad.budget_kind, "budgets": list(lad.budgets),
          "points": [{**p, "trial": n} for p, n in zip(points, names, strict=True)]}
