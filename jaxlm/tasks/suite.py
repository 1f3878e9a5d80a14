"""A set of tasks scored together, as `jaxlm eval --tasks` and train.eval_tasks run them."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from jaxlm import model as model_lib
from jaxlm import tokenizers
from jaxlm.errors import JaxlmError
from jaxlm.tasks import scorer as scorer_lib
from jaxlm.tasks import task as task_lib

PyTree = Any


class Suite:
  """Loads the tasks, encodes their requests and checks them against the block size up front
  (so a bad task fails before any compilation), then scores any params on demand."""

  def __init__(self, names: list[str], model: model_lib.DecoderLM,
               tokenizer: tokenizers.Tokenizer, *, truncation: str = "left",
               mesh: jax.sharding.Mesh | None = None, batch_size: int = 32):
    if not names:
      raise JaxlmError("no tasks given")
    self.tasks = [task_lib.load(n) for n in names]
    seen = [t.name for t in self.tasks]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
      raise JaxlmError(f"task {twice[0]!r} is named twice in the task list")
    place = None
    if mesh is not None:  # Replicated over the mesh: works across processes too.
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      def place(x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, replicated, lambda idx: x[idx])
    self.scorer = scorer_lib.Scorer(model, None, tokenizer, batch_size=batch_size,
                                    truncation=truncation, place=place)
    self.encoded = {}
    for t in self.tasks:
      if t.type != "rolling":
        pairs, where = task_lib.requests(t, tokenizer)
        for (ctx, cont), w in zip(pairs, where, strict=True):
          self.scorer.rows(ctx, cont, w)  # Raises for a request that cannot be scored.
        self.encoded[t.name] = (pairs, where)

  def evaluate(self, params: PyTree) -> dict[str, dict[str, float]]:
    """Per task: its metrics, plus `examples_per_sec`."""
    self.scorer.params = params
    out = {}
    for t in self.tasks:
      t0 = time.perf_counter()
      out[t.name] = task_lib.evaluate(t, self.scorer, self.encoded.get(t.name))
      out[t.name]["examples_per_sec"] = len(t.examples) / (time.perf_counter() - t0)
    return out


def flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
  """{"tasks/<name>/<metric>": value} plus tasks/core when two or more tasks have accuracy."""
  flat = {f"tasks/{name}/{k}": v for name, r in results.items() for k, v in r.items()
          if k not in ("chance", "examples_per_sec")}
  if sum("acc" in r for r in results.values()) >= 2:
    flat["tasks/core"] = task_lib.core(results)
  return flat


def summary(results: dict[str, dict[str, float]]) -> str:
  """One log line: each task's accuracies (or bits per byte), then the CORE aggregate."""
  parts = [f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                  if k in ("acc", "acc_norm", "bpb"))
           for name, r in results.items()]
  flat = flatten(results)
  if "tasks/core" in flat:
    parts.append(f"core {flat['tasks/core']:.3f}")
  return " | ".join(parts)
