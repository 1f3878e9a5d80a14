"""Memory per device (params, optimizer state, gradients, activations) under a mesh."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.errors import JaxlmError
from jaxlm.params import anatomy

PyTree = Any
GIB = 2**30


def shard_elements(shape: tuple[int, ...], names: tuple[str | None, ...] | None,
                   rules: sharding.Rules, mesh_sizes: dict[str, int]) -> int:
  """Elements of one device's shard of a tensor with logical axes `names` under `rules`."""
  if names is None:
    return math.prod(shape)
  spec = nn.logical_to_mesh_axes(names, rules)
  n = 1
  for i, dim in enumerate(shape):
    ways = sharding.split_ways(spec[i] if i < len(spec) else None, mesh_sizes)
    # sharding.logical_shardings replicates a dimension the mesh does not divide evenly.
    n *= dim // ways if dim % ways == 0 else dim
  return n


def state_bytes(tree: PyTree, rules: sharding.Rules,
                mesh_sizes: dict[str, int]) -> tuple[int, int]:
  """(total, per-device) bytes of a boxed abstract tree sharded by its logical axes."""
  total = per_device = 0
  for leaf in jax.tree.leaves(tree, is_leaf=anatomy.is_box):
    value = leaf.value if anatomy.is_box(leaf) else leaf
    if not hasattr(value, "shape"):
      continue  # A multi_transform state's MaskedNode: another group's tensor, no array.
    itemsize = np.dtype(value.dtype).itemsize
    total += math.prod(value.shape) * itemsize
    # Boxes whose names do not fit the rank (adafactor's factored moments) are replicated.
    names = (tuple(leaf.names) if anatomy.is_box(leaf) and len(leaf.names) == len(value.shape)
             else None)
    per_device += shard_elements(tuple(value.shape), names, rules, mesh_sizes) * itemsize
  return total, per_device


def activation_bytes_per_token(mcfg: model_lib.ModelConfig, *, tensor_ways: int = 1) -> float:
  """Estimated bytes of activations one token keeps alive for the backward pass.

  Per token and block, without rematerialisation (c = bytes of model.dtype; the attention
  probabilities are float32):
    c·(6·D + 2·G·K + 2·F)  inputs of the two LayerNorms and of the four matmuls (5·D), the
                           queries (H·K = D), keys and values (2·G·K), the MLP before and after
                           GELU (2·F);
    4·H·T                  the softmax probabilities, a row of T per head;
    H·T + 2·D              1-byte dropout keep-masks, only when model.dropout > 0.
  Once per token: the embedding sum and the final LayerNorm input (2·D·c, plus a D-byte mask
  with dropout) and the float32 logits and their softmax in the loss (2·4·V). This is the
  accounting of Korthikanti et al. 2022 (sbh(34 + 5as/h) for fp16 with dropout) for this model.
  Head, MLP and vocab terms divide by `tensor_ways` under tensor parallelism.

  model.remat keeps less per block, plus one block's full activations while it is recomputed:
    full  only the block's input, c·D;
    dots  the input and the outputs of the weight matmuls (q, k/v, attention out, fc, proj),
          c·(4·D + 2·G·K + F); the attention einsums have batch dimensions and are recomputed.
  """
  c = np.dtype(model_lib.DTYPES[mcfg.dtype]).itemsize
  D, T, H, G, K, F = (mcfg.d_model, mcfg.block_size, mcfg.n_head, mcfg.kv_heads,
                      mcfg.head_dim, mcfg.ff_dim)
  tp = tensor_ways
  # Under tensor parallelism the LayerNorm inputs and outputs are whole on every device.
  block = c * (4 * D + (2 * D + 2 * G * K + 2 * F) / tp) + 4 * H * T / tp
  once = 2 * D * c + 2 * 4 * mcfg.vocab_size / tp
  if mcfg.dropout > 0:
    block += H * T / tp + 2 * D
    once += D
  kept = {"none": block, "full": c * D, "dots": c * (3 * D + (D + 2 * G * K + F) / tp)}
  if mcfg.remat not in kept:
    raise JaxlmError(f"no activation estimate for model.remat={mcfg.remat!r}")
  layers = mcfg.n_layer * kept[mcfg.remat] + (block if mcfg.remat != "none" else 0)
  return layers + once
