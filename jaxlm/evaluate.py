"""Pure evaluation step and the loop over a fixed set of evaluation batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import losses
from jaxlm import model as model_lib

PyTree = Any


def eval_step(params: PyTree, batch: dict[str, jax.Array], *,
              model: model_lib.GPT) -> dict[str, jax.Array]:
  """Summed cross-entropy (nats) and token count of one batch; no dropout."""
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], train=False)
  loss, aux = losses.cross_entropy(logits_BxLxV, batch["targets"], batch.get("loss_mask"))
  return {"loss_sum": loss * aux["tokens"], "tokens": aux["tokens"]}


def evaluate(eval_fn: Callable[[PyTree, dict[str, jax.Array]], dict[str, jax.Array]],
             params: PyTree, batches: Iterable[dict[str, jax.Array]]) -> dict[str, float]:
  """Token-weighted mean loss over `batches`, plus perplexity and bits per token."""
  loss_sum, tokens = jnp.zeros(()), jnp.zeros(())
  for batch in batches:
    out = eval_fn(params, batch)
    loss_sum, tokens = loss_sum + out["loss_sum"], tokens + out["tokens"]
  loss = float(loss_sum / jnp.maximum(tokens, 1.0))  # The one host sync of an evaluation.
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_token": loss / math.log(2.0)}
