"""GPT-2-style decoder-only transformer in flax linen, with logical axis names on every parameter.

Read top to bottom: config -> attention -> MLP -> block -> model. Tensor names end with their
shape in the letters of jaxlm/axes.py (B batch, L length, D width, H heads, G kv heads,
K head dim, F MLP width, V vocab).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import axes
from jaxlm.errors import JaxlmError

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What the backward pass may keep from the forward pass of a block (the rest is recomputed):
# "full" keeps only the block's input, "dots" also keeps matmul outputs (cheap to store, the
# costly part to recompute).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters (names follow GPT-2 / nanoGPT)."""
  vocab_size: int
  block_size: int = 256
  n_layer: int = 4
  n_head: int = 4
  n_kv_head: int = 0  # 0 = n_head (plain multi-head attention); fewer = grouped-query attention.
  d_model: int = 128
  d_ff: int = 0  # 0 = 4 * d_model.
  dropout: float = 0.0
  bias: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype of matmuls; softmax, logits and loss always run in f32.
  param_dtype: str = "float32"
  remat: str = "none"  # Recompute activations in the backward pass: none | full | dots.
  scan_layers: bool = False  # One scanned block (params stacked on a `layers` axis).

  def __post_init__(self):
    def fail(msg):
      raise JaxlmError(f"invalid model config: {msg}")
    for name in ("vocab_size", "n_layer", "n_head", "d_model"):
      if getattr(self, name) < 1:
        fail(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if self.block_size < 1:
      fail(f"model.block_size must be >= 1, got {self.block_size}")
    if self.d_model % self.n_head:
      fail(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
    if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
      fail(f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}")
    if self.d_ff < 0:
      fail(f"model.d_ff must be >= 0 (0 = 4 * d_model), got {self.d_ff}")
    if not 0.0 <= self.dropout < 1.0:
      fail(f"model.dropout must be in [0, 1), got {self.dropout}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        fail(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      fail(f"model.remat={self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def ff_dim(self) -> int:
    return self.d_ff or 4 * self.d_model


def _init(std: float, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _zeros(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


# GPT-2 initialisation: N(0, 0.02) everywhere, and residual-stream output projections scaled
# by 1/sqrt(2 * n_layer) so the residual variance does not grow with depth.
INIT_STD = 0.02


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  """LayerNorm computed in float32 (the caller casts back to the compute dtype)."""
  return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=jnp.float32,
                      param_dtype=DTYPES[cfg.param_dtype], scale_init=_ones((axes.EMBED,)),
                      bias_init=_zeros((axes.EMBED,)), name=name)


class CausalSelfAttention(nn.Module):
  """Multi-head (or grouped-query) causal self-attention; scores and softmax in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    H, G, K = cfg.n_head, cfg.kv_heads, cfg.head_dim
    dense = dict(use_bias=cfg.bias, dtype=DTYPES[cfg.dtype],
                 param_dtype=DTYPES[cfg.param_dtype])
    q_BxLxHxK = nn.DenseGeneral(
        (H, K), kernel_init=_init(INIT_STD, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
        bias_init=_zeros((axes.HEADS, axes.HEAD_DIM)), name="query", **dense)(x_BxLxD)
    # Keys and values share one projection: one matmul instead of two.
    kv_BxLx2xGxK = nn.DenseGeneral(
        (2, G, K), kernel_init=_init(INIT_STD, (axes.EMBED, None, axes.KV_HEADS, axes.HEAD_DIM)),
        bias_init=_zeros((None, axes.KV_HEADS, axes.HEAD_DIM)), name="key_value",
        **dense)(x_BxLxD)
    k_BxSxGxK, v_BxSxGxK = kv_BxLx2xGxK[:, :, 0], kv_BxLx2xGxK[:, :, 1]

    B, L = x_BxLxD.shape[:2]
    # Grouped-query attention: each of the G kv heads serves R = H // G query heads.
    q_BxLxGxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K)
    scores_BxGxRxLxS = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK,
                                  preferred_element_type=jnp.float32) / math.sqrt(K)
    causal_LxS = jnp.tril(jnp.ones((L, L), dtype=bool))
    scores_BxGxRxLxS = jnp.where(causal_LxS, scores_BxGxRxLxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxLxS = jax.nn.softmax(scores_BxGxRxLxS, axis=-1)
    probs_BxGxRxLxS = nn.Dropout(cfg.dropout)(probs_BxGxRxLxS, deterministic=not train)
    out_BxLxGxRxK = jnp.einsum("bgrls,bsgk->blgrk", probs_BxGxRxLxS.astype(v_BxSxGxK.dtype),
                               v_BxSxGxK)
    out_BxLxHxK = out_BxLxGxRxK.reshape(B, L, H, K)
    out_BxLxD = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1),
        kernel_init=_init(INIT_STD / math.sqrt(2 * cfg.n_layer),
                          (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        bias_init=_zeros((axes.EMBED,)), name="out", **dense)(out_BxLxHxK)
    return nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=not train)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    dense = dict(use_bias=cfg.bias, dtype=DTYPES[cfg.dtype],
                 param_dtype=DTYPES[cfg.param_dtype])
    h_BxLxF = nn.Dense(cfg.ff_dim, kernel_init=_init(INIT_STD, (axes.EMBED, axes.MLP)),
                       bias_init=_zeros((axes.MLP,)), name="fc", **dense)(x_BxLxD)
    h_BxLxF = nn.gelu(h_BxLxF, approximate=True)  # GPT-2 uses the tanh approximation.
    out_BxLxD = nn.Dense(cfg.d_model,
                         kernel_init=_init(INIT_STD / math.sqrt(2 * cfg.n_layer),
                                           (axes.MLP, axes.EMBED)),
                         bias_init=_zeros((axes.EMBED,)), name="proj", **dense)(h_BxLxF)
    return nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=not train)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

  With `scanned`, it has the (carry, per-layer output) signature that `nn.scan` expects.
  """
  cfg: ModelConfig
  train: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, _: Any = None) -> Any:
    cfg, dtype = self.cfg, x_BxLxD.dtype
    h_BxLxD = layer_norm(cfg, "ln_1")(x_BxLxD).astype(dtype)
    x_BxLxD = x_BxLxD + CausalSelfAttention(cfg, name="attn")(h_BxLxD, train=self.train)
    h_BxLxD = layer_norm(cfg, "ln_2")(x_BxLxD).astype(dtype)
    x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(h_BxLxD, train=self.train)
    return (x_BxLxD, None) if self.scanned else x_BxLxD


class GPT(nn.Module):
  """tokens_BxL -> logits_BxLxV (float32)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.cfg
    L = tokens_BxL.shape[1]
    if L > cfg.block_size:
      raise JaxlmError(f"sequence length {L} exceeds model.block_size={cfg.block_size}")
    # Embedding lookups are free, so the tables are kept (and read) in float32.
    wte = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32,
                   param_dtype=DTYPES[cfg.param_dtype],
                   embedding_init=_init(INIT_STD, (axes.VOCAB, axes.EMBED)), name="wte")
    wpe = nn.Embed(cfg.block_size, cfg.d_model, dtype=jnp.float32,
                   param_dtype=DTYPES[cfg.param_dtype],
                   embedding_init=_init(INIT_STD, (None, axes.EMBED)), name="wpe")
    x_BxLxD = wte(tokens_BxL) + wpe(jnp.arange(L))[None]
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=not train)
    x_BxLxD = x_BxLxD.astype(DTYPES[cfg.dtype])
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # One traced block whatever the depth, so compile time stays flat in n_layer. Params
      # gain a leading `layers` axis: h/attn/query/kernel is [N, D, H, K].
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                      "dropout": True}, length=cfg.n_layer,
                      metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      x_BxLxD, _ = stack(cfg, train=train, scanned=True, name="h")(x_BxLxD, None)
    else:
      for i in range(cfg.n_layer):
        x_BxLxD = block(cfg, train=train, name=f"h_{i}")(x_BxLxD)
    x_BxLxD = layer_norm(cfg, "ln_f")(x_BxLxD)
    if cfg.tie_embeddings:
      # Weight tying (Press & Wolf, 2017): the output head reuses the token embedding.
      return wte.attend(x_BxLxD)
    return nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.float32,
                    param_dtype=DTYPES[cfg.param_dtype],
                    kernel_init=_init(INIT_STD, (axes.EMBED, axes.VOCAB)),
                    name="lm_head")(x_BxLxD)


def make_model(cfg: ModelConfig) -> GPT:
  return GPT(cfg)


def init_params(model: GPT, rng: jax.Array) -> PyTree:
  """Boxed params ({'wte': {'embedding': Partitioned}, ...}); train.py unboxes them."""
  tokens_1xL = jnp.zeros((1, model.cfg.block_size), dtype=jnp.int32)
  return model.init({"params": rng}, tokens_1xL, train=False)["params"]
