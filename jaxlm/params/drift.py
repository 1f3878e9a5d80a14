"""Drift of a trained run's parameters from their random initialisation, per tensor."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxlm import model as model_lib
from jaxlm import resume as resume_lib
from jaxlm import runs
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError
from jaxlm.params import anatomy

PyTree = Any


def initial_params(model: model_lib.DecoderLM, seed: int) -> PyTree:
  """θ₀ of a run: the params `train.train_and_evaluate` starts from, bit for bit.

  Jitted like training's init: run op by op, the sampling and scaling round differently in the
  last bit, and θ − θ₀ of an untrained run would not be exactly zero.
  """
  init_rng, _ = step_lib.init_rngs(seed)
  return jax.jit(lambda rng: nn.unbox(model_lib.init_params(model, rng)))(init_rng)


def _sq(x: np.ndarray) -> float:
  return float(np.sum(np.square(x)))


def _drift(delta_sq: float, init_sq: float) -> float | None:
  # Relative drift is undefined where the init is all zeros (biases, LayerNorm shifts).
  return math.sqrt(delta_sq / init_sq) if init_sq > 0 else None


def drift_report(params: PyTree, params0: PyTree, *, scanned: bool = False) -> dict[str, Any]:
  """Per tensor, layer and kind: RMS, mean, std and drift ‖θ − θ₀‖ / ‖θ₀‖ (float64 on the host).

  Tensors initialised to zero (biases) have no relative drift (None); compare them, and
  everything else, by `delta_rms` = ‖θ − θ₀‖ / √count. With `scanned` (model.scan_layers),
  the stacked blocks are reported one layer at a time under the unscanned names h_i/...
  """
  init = {t_path: x for t_path, x in _flat(params0, scanned)}
  rows, groups = [], {"layer": {}, "kind": {}}
  total = {"sq": 0.0, "init_sq": 0.0, "delta_sq": 0.0, "count": 0}
  for path, x in _flat(params, scanned):
    if path not in init:
      raise JaxlmError(f"parameter {path} has no counterpart in the initialisation: the run's "
                       "model config does not match its checkpoint")
    theta = np.asarray(x, dtype=np.float64)
    theta0 = np.asarray(init[path], dtype=np.float64)
    if theta.shape != theta0.shape:
      raise JaxlmError(f"parameter {path} has shape {theta.shape} but its init has "
                       f"{theta0.shape}")
    t = anatomy.Tensor(path, theta.shape, np.dtype(x.dtype).name, None)
    sums = {"sq": _sq(theta), "init_sq": _sq(theta0), "delta_sq": _sq(theta - theta0),
            "count": t.count}
    rows.append({
        "path": path, "kind": t.kind, "layer": t.layer, "shape": list(t.shape),
        "count": t.count, "rms": math.sqrt(sums["sq"] / t.count), "mean": float(theta.mean()),
        "std": float(theta.std()), "norm": math.sqrt(sums["sq"]),
        "init_norm": math.sqrt(sums["init_sq"]), "delta_norm": math.sqrt(sums["delta_sq"]),
        "delta_rms": math.sqrt(sums["delta_sq"] / t.count),
        "drift": _drift(sums["delta_sq"], sums["init_sq"])})
    for key, name in (("layer", t.layer), ("kind", t.kind)):
      acc = groups[key].setdefault(name, {"sq": 0.0, "init_sq": 0.0, "delta_sq": 0.0, "count": 0})
      for k in acc:
        acc[k] += sums[k]
    for k in total:
      total[k] += sums[k]

  def summary(acc):
    return {"count": acc["count"], "norm": math.sqrt(acc["sq"]),
            "init_norm": math.sqrt(acc["init_sq"]), "delta_norm": math.sqrt(acc["delta_sq"]),
            "delta_rms": math.sqrt(acc["delta_sq"] / max(acc["count"], 1)),
            "drift": _drift(acc["delta_sq"], acc["init_sq"])}

  rows.sort(key=lambda r: anatomy.layer_sort_key(r["layer"]))
  by_layer = {name: summary(groups["layer"][name])
              for name in sorted(groups["layer"], key=anatomy.layer_sort_key)}
  return {"tensors": rows, "by_layer": by_layer,
          "by_kind": {name: summary(acc) for name, acc in groups["kind"].items()},
          "global": summary(total),
          "most_changed": [r["path"] for r in sorted(rows, key=lambda r: -r["delta_rms"])[:5]]}


def _flat(params: PyTree, scanned: bool) -> list[tuple[str, Any]]:
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]:
    name = model_lib.path_name(path)
    top, _, rest = name.partition("/")
    if scanned and top == model_lib.BLOCKS:  # The stacked blocks: params [N, ...].
      stack = np.asarray(x)
      out += [(f"{model_lib.block_name(i)}/{rest}", stack[i]) for i in range(stack.shape[0])]
    else:
      out.append((name, x))
  return out


def run_report(workdir: str, step: int | str | None = None) -> dict[str, Any]:
  """Per-tensor statistics and drift from init of the run in `workdir` at `step`.

  `step`: a checkpoint step, 'best', or None / 'latest'.
  """
  run = runs.load_run(workdir, step)
  # The seed the run began with: config.json says the latest one (an older jaxlm let a
  # resume change it), the history the first.
  seed = resume_lib.original_seed(workdir, run.cfg.seed)
  report = drift_report(run.params, initial_params(run.model, seed),
                        scanned=run.model.cfg.scan_layers)
  report.update(workdir=workdir, step=int(run.step), seed=seed,
                total=sum(r["count"] for r in report["tensors"]), warnings=[])
  if run.cfg.train.init_from:
    report["warnings"].append(
        f"this run started from train.init_from={run.cfg.train.init_from!r}: drift is measured "
        f"from the random init of seed {seed}, not from those params")
  return report
