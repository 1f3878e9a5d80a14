"""Pure evaluation step, and a fixed set of evaluation batches summed in one call."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import losses
from jaxlm import model as model_lib

PyTree = Any


def eval_step(params: PyTree, batch: dict[str, jax.Array], *,
              model: model_lib.DecoderLM) -> dict[str, jax.Array]:
  """Summed cross-entropy (nats) and token count of one batch; no dropout."""
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], train=False)
  loss, aux = losses.cross_entropy(logits_BxLxV, batch["targets"], batch.get("loss_mask"))
  return {"loss_sum": loss * aux["tokens"], "tokens": aux["tokens"]}


def eval_steps(params: PyTree, batches: dict[str, jax.Array], *,
               model: model_lib.DecoderLM) -> dict[str, jax.Array]:
  """`eval_step` over a leading axis of N batches in one call (lax.scan), summed.

  One call and one host sync per evaluated split instead of N calls and N host-side adds; the
  same sums in the same order.
  """
  first = jax.tree.map(lambda x: x[0], batches)
  shapes = jax.eval_shape(functools.partial(eval_step, model=model), params, first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(total, batch):
    return jax.tree.map(jnp.add, total, eval_step(params, batch, model=model)), None
  return jax.lax.scan(body, zeros, batches)[0]


def stack(batches: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Host batches -> one dict of arrays with a leading batch-index axis (for `eval_steps`)."""
  batches = list(batches)
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def evaluate(eval_fn: Callable[[PyTree, dict[str, jax.Array]], dict[str, jax.Array]],
             params: PyTree, batches: dict[str, jax.Array],
             n_bytes: int | None = None) -> dict[str, float]:
  """Token-weighted mean loss over stacked `batches` (jitted `eval_steps` as eval_fn), plus
  perplexity, bits per token and, given the UTF-8 bytes the targets stand for, bits per byte
  (`bpb`: the summed loss in bits over those bytes, comparable across tokenizers)."""
  out = eval_fn(params, batches)
  loss = float(out["loss_sum"] / jnp.maximum(out["tokens"], 1.0))  # The one host sync.
  result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_token": loss / math.log(2.0)}
  if n_bytes is not None:
    result["bpb"] = float(out["loss_sum"]) / math.log(2.0) / max(n_bytes, 1)
  return result
