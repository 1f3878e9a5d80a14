"""Anatomy: one row per parameter tensor, its kind and layer, and the analytic counts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxlm import axes
from jaxlm import model as model_lib

PyTree = Any
GIB = 2**30
KINDS = ("weight", "bias", "embedding", "norm scale")
# The last name on a parameter's path says what it is. LayerNorm's shift is a bias too.
KIND_OF_NAME = {"kernel": "weight", "bias": "bias", "embedding": "embedding",
                "scale": "norm scale"}

PARAM_FORMULA = (
    "V·D + p·T·D [wte, wpe] + N·(2·D + q·2·K [norm scales] + D·(H+2G)·K + H·K·D + m·D·F "
    "[kernels] + b·((H+2G)·K + D + (m-1)·F + D) + b·l·2·D [biases]) + D + b·l·D [ln_f] + "
    "(untied: D·V); p = 1 for learned positions (0 for rope), m = 2 for gelu and relu2 (3 for "
    "swiglu), l = 1 for layernorm (0 for rmsnorm, which has no shift), q = 1 with "
    "model.qk_norm (a [K] scale each for queries and keys)")
FLOPS_CONVENTION = (
    "6·N + 12·n_layer·d_model·block_size (forward + backward; N = parameters in matmuls, i.e. "
    "all but the position embeddings, a tied embedding counted once, as nanoGPT's "
    "estimate_mfu; the second term is the attention scores and weighted values; with "
    "model.attention_window, n_layer·block_size becomes the sum over layers of "
    "min(window, block_size))")



@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter tensor: where it lives, its shape, and what kind of parameter it is."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple[str | None, ...] | None

  @property
  def count(self) -> int:
    return math.prod(self.shape)

  @property
  def kind(self) -> str:
    return KIND_OF_NAME.get(self.path.rsplit("/", 1)[-1], "other")

  @property
  def layer(self) -> str:
    # The top-level module, the same grouping as the per-layer stats of the train step.
    return self.path.split("/", 1)[0]


def is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


# Where each top-level module sorts; the blocks (2) sort among themselves by their index.
_LAYER_ORDER = {model_lib.TOKEN_EMBED: 0, model_lib.POSITION_EMBED: 1, model_lib.FINAL_NORM: 3,
                model_lib.HEAD: 4}


def layer_sort_key(layer: str) -> tuple[int, int, str]:
  """Model order: embeddings, blocks h_0 .. h_{n-1} (numerically), final norm, head."""
  i = model_lib.block_index(layer)
  if i is not None:
    return (2, i, layer)
  return (_LAYER_ORDER.get(layer, 5), 0, layer)


def tensors(params: PyTree) -> list[Tensor]:
  """Rows of the parameter table, in model order; `params` may be boxed, abstract or concrete."""
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]:
    names = tuple(leaf.names) if is_box(leaf) else None
    value = leaf.value if is_box(leaf) else leaf
    rows.append(Tensor(model_lib.path_name(path), tuple(int(d) for d in value.shape),
                       np.dtype(value.dtype).name, names))
  return sorted(rows, key=lambda t: layer_sort_key(t.layer))  # Stable: keeps order in a layer.


def formula_param_counts(mcfg: model_lib.ModelConfig) -> dict[str, int]:
  """Parameter counts by kind from the architecture alone (no flax tree); see PARAM_FORMULA.

  Letters: V vocab, T block_size, D d_model, N n_layer, H heads, G kv heads, K head dim,
  F d_ff, b = 1 with biases else 0, p = 1 with a learned position table, m = matrices in the
  MLP (2 for gelu and relu2, 3 for swiglu), l = 1 when the norms are LayerNorms (RMSNorm has
  no shift), q = 1 with model.qk_norm (its query and key scales, [K] each, per block).
  """
  V, T, D, N = mcfg.vocab_size, mcfg.block_size, mcfg.d_model, mcfg.n_layer
  H, G, K, F = mcfg.n_head, mcfg.kv_heads, mcfg.head_dim, mcfg.ff_dim
  b = int(mcfg.bias)
  p = int(mcfg.position == "learned")
  m = 3 if mcfg.mlp == "swiglu" else 2
  ln = int(mcfg.norm == "layernorm")
  q = int(mcfg.qk_norm)
  qkv = (H + 2 * G) * K  # Query heads plus one key and one value per kv head.
  counts = {
      "weight": N * (D * qkv + H * K * D + m * D * F) + (0 if mcfg.tie_embeddings else D * V),
      # Per block: q/k/v, attention out, fc (and gate), proj, and the shifts of the two norms.
      "bias": b * (N * (qkv + D + (m - 1) * F + D + ln * 2 * D) + ln * D),
      "embedding": V * D + p * T * D,
      "norm scale": N * (2 * D + q * 2 * K) + D,
  }
  counts["total"] = sum(counts.values())
  return counts


def formula_block_params(mcfg: model_lib.ModelConfig) -> int:
  """Parameters of one transformer block: what one more layer adds to the formula."""
  counts = [formula_param_counts(dataclasses.replace(mcfg, n_layer=n))["total"] for n in (1, 2)]
  return counts[1] - counts[0]


def count_by(rows: Iterable[Tensor], key: str) -> dict[str, int]:
  out: dict[str, int] = {}
  for t in rows:
    out[getattr(t, key)] = out.get(getattr(t, key), 0) + t.count
  return out


def count_by_layer(rows: Iterable[Tensor]) -> dict[str, int]:
  """Counts per layer, in model order; a stacked tensor (scan_layers) counts 1/N for each h_i."""
  out: dict[str, int] = {}
  for t in rows:
    if t.logical_axes and t.logical_axes[0] == axes.LAYERS:
      for i in range(t.shape[0]):
        name = model_lib.block_name(i)
        out[name] = out.get(name, 0) + t.count // t.shape[0]
    else:
      out[t.layer] = out.get(t.layer, 0) + t.count
  return {k: out[k] for k in sorted(out, key=layer_sort_key)}
