"""Decoder-only transformer (GPT-2 and LLaMA families) in flax linen, logical axes on every param.

The config, the parameter path names and the KV-cache pytree are in jaxlm/model_config.py
(every name re-exported here); this file reads top to bottom: norms, RoPE and dropout ->
attention -> MLP -> block -> DecoderLM -> make_model / init_params / count_params / path_name.
The projections are kernels.Linear and hash dropout is kernels.HashDropout: flax's Dense and
Dropout, arranged so XLA:CPU runs them faster (jaxlm/kernels.py says how).
GPT-2 is LayerNorm, learned positions and a GELU MLP; LLaMA is RMSNorm, rotary positions and a
SwiGLU MLP. Each piece is its own ModelConfig field, so any mix builds; the parameter paths of
the GPT-2 pieces do not depend on the others (h_0/attn/query/kernel, wte/embedding, ln_f/scale),
and every module that reads a path takes its names from model_config's constants. Newer recipes are
off by default and mix with either family: qk_norm, logit_softcap, the relu2 MLP,
zero_init_proj and per-layer sliding windows (attention_window).
Tensor names end with their shape in the letters of jaxlm/axes.py (B batch, L length, S key
length, D width, H heads, G kv heads, K head dim, F MLP width, V vocab).

Decoding (jaxlm/sample.py) passes an explicit cache pytree instead of using flax's mutable
"cache" collection: `apply(params, tokens_BxL, positions_BxL=..., cache=cache)` returns
`(logits_BxLxV, new_cache)`, so prefill and decode steps are plain pure functions whose state
can be carried through `lax.while_loop`. Slot s of a layer's cache holds the key and value of
the token at position s, so each row of a batch can be at its own position and no padding mask
is needed. Without a cache the call is the training forward pass and returns logits only.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import attention, axes
from jaxlm.errors import JaxlmError
from jaxlm.kernels import HashDropout, Linear
from jaxlm.model_config import (  # noqa: F401  (re-exported: the model's vocabulary)
  ATTN,
  ATTN_NORM,
  ATTN_OUT,
  BLOCKS,
  DTYPES,
  FINAL_NORM,
  FULL_WINDOW,
  HEAD,
  KEY_NORM,
  KEY_VALUE,
  MLP_GATE,
  MLP_IN,
  MLP_NORM,
  MLP_OUT,
  MLP_SUBLAYER,
  MLPS,
  NORMS,
  POSITION_EMBED,
  POSITIONS,
  QUERY,
  QUERY_NORM,
  REMAT_POLICIES,
  TOKEN_EMBED,
  Cache,
  LayerCache,
  ModelConfig,
  PyTree,
  block_index,
  block_name,
  init_cache,
  parse_windows,
)


def _init(std: float, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _zeros(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


# GPT-2 initialisation: N(0, 0.02) everywhere, and residual-stream output projections scaled
# by 1/sqrt(2 * n_layer) so the residual variance does not grow with depth.
INIT_STD = 0.02


def layer_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm or RMSNorm (model.norm) computed in float32 (the caller casts back)."""
  if cfg.norm == "rmsnorm":
    # No mean subtraction and no shift: LLaMA's norm, one scale vector only.
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32,
                      param_dtype=DTYPES[cfg.param_dtype], scale_init=_ones((axes.EMBED,)),
                      name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=jnp.float32,
                      param_dtype=DTYPES[cfg.param_dtype], scale_init=_ones((axes.EMBED,)),
                      bias_init=_zeros((axes.EMBED,)), name=name)


def qk_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """model.qk_norm: RMSNorm over the head dim with one learned scale per dim, in float32.

  RMSNorm whatever model.norm is, as OLMo 2, Gemma 3 and modded-nanogpt do: a LayerNorm's
  shift on the keys would add the same q.b to every score of a query (the softmax cancels
  it), and its mean subtraction removes a direction of the head space; the point here is only
  to bound the scale of q.k. The scale [K] is shared by the heads of a layer (as Gemma 3).
  """
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32,
                    param_dtype=DTYPES[cfg.param_dtype], scale_init=_ones((axes.HEAD_DIM,)),
                    name=name)


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding in the "rotate half" layout (as Hugging Face LLaMA).

  Dimension i of the first half pairs with dimension i of the second half and the pair turns
  by positions * theta^(-2i/K). A query at position p and a key at position s then score
  as a function of p - s only. Computed in float32, returned in x's dtype.
  """
  K = x_BxLxHxK.shape[-1]
  inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[:, :, None] * inv_freq_K2[None, None]
  cos_BxLx1xK = jnp.cos(jnp.concatenate([angles_BxLxK2, angles_BxLxK2], -1))[:, :, None]
  sin_BxLx1xK = jnp.sin(jnp.concatenate([angles_BxLxK2, angles_BxLxK2], -1))[:, :, None]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :K // 2], x[..., K // 2:]
  rotated_BxLxHxK = jnp.concatenate([-x2, x1], -1)
  return (x * cos_BxLx1xK + rotated_BxLxHxK * sin_BxLx1xK).astype(x_BxLxHxK.dtype)


def dropout(cfg: ModelConfig) -> nn.Module:
  """The dropout module of cfg: flax's (masks from jax.random) or HashDropout."""
  return HashDropout(cfg.dropout) if cfg.hash_dropout else nn.Dropout(cfg.dropout)


def out_init(cfg: ModelConfig, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """Kernel init of a projection back into the residual stream (attention out, MLP proj):
  GPT-2's scaled normal, or zeros with model.zero_init_proj (modded-nanogpt): every block then
  starts by passing the residual stream through unchanged, and the projections grow from their
  gradients (which are not zero: they are the sublayer's input times the residual's)."""
  if cfg.zero_init_proj:
    return _zeros(names)
  return _init(INIT_STD / math.sqrt(2 * cfg.n_layer) * cfg.hidden_init_mult, names)


def hidden_init(cfg: ModelConfig, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """Kernel init of a hidden projection out of the residual stream (query, key_value, fc,
  gate): GPT-2's N(0, 0.02), times μP's 1 / sqrt(width_mult) (1.0 under sp)."""
  return _init(INIT_STD * cfg.hidden_init_mult, names)


class CausalSelfAttention(nn.Module):
  """Multi-head (or grouped-query) causal self-attention; scores and softmax in float32.

  `window` is the layer's sliding window W (a query at t sees keys t-W+1 .. t), 0 = full
  causal attention, -1 = the traced `layer_window` argument holds it (a scanned block, whose
  layers differ in their windows; 0 there is also full).
  """
  cfg: ModelConfig
  window: int = 0

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool, positions_BxL: jax.Array | None = None,
               cache: LayerCache | None = None,
               layer_window: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    cfg, window = self.cfg, self.window
    H, G, K = cfg.n_head, cfg.kv_heads, cfg.head_dim
    dense = dict(use_bias=cfg.bias, dtype=DTYPES[cfg.dtype],
                 param_dtype=DTYPES[cfg.param_dtype])
    q_BxLxHxK = Linear(
        (H, K), kernel_init=hidden_init(cfg, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
        bias_init=_zeros((axes.HEADS, axes.HEAD_DIM)), name=QUERY, **dense)(x_BxLxD)
    # Keys and values share one projection: one matmul instead of two.
    kv_BxLx2xGxK = Linear(
        (2, G, K), kernel_init=hidden_init(cfg, (axes.EMBED, None, axes.KV_HEADS, axes.HEAD_DIM)),
        bias_init=_zeros((None, axes.KV_HEADS, axes.HEAD_DIM)), name=KEY_VALUE,
        **dense)(x_BxLxD)
    k_BxSxGxK, v_BxSxGxK = kv_BxLx2xGxK[:, :, 0], kv_BxLx2xGxK[:, :, 1]
    if cfg.qk_norm:
      # Before RoPE, as OLMo 2 and Gemma 3: the rotation keeps the norm, so the scores stay
      # bounded by the learned scales.
      q_BxLxHxK = qk_norm(cfg, QUERY_NORM)(q_BxLxHxK).astype(q_BxLxHxK.dtype)
      k_BxSxGxK = qk_norm(cfg, KEY_NORM)(k_BxSxGxK).astype(k_BxSxGxK.dtype)

    B, L = x_BxLxD.shape[:2]
    if cfg.position == "rope":
      if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
      # Keys are rotated before they enter the cache: a cached key keeps its own position.
      q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
      k_BxSxGxK = rope(k_BxSxGxK, positions_BxL, cfg.rope_theta)
    # Grouped-query attention: each of the G kv heads serves R = H // G query heads. Attention
    # runs head-major (heads before positions): its batched matmuls then read and write
    # contiguous [positions x head_dim] matrices. One transpose of q, k and v each (and of the
    # output) replaces the copies XLA made per query block.
    q_BxGxRxLxK = q_BxLxHxK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4)

    def attend(q_BxGxRxLxK, k_BxGxSxK, v_BxGxSxK, visible):
      """softmax(q k^T / divisor) v over the keys `visible` lets each query see (divisor =
      sqrt(K), or under μP K / sqrt(K_base): ModelConfig.attention_divisor)."""
      scores_BxGxRxLxS = jnp.einsum("bgrlk,bgsk->bgrls", q_BxGxRxLxK, k_BxGxSxK,
                                    preferred_element_type=jnp.float32) / cfg.attention_divisor
      scores_BxGxRxLxS = jnp.where(visible, scores_BxGxRxLxS, jnp.finfo(jnp.float32).min)
      probs_BxGxRxLxS = jax.nn.softmax(scores_BxGxRxLxS, axis=-1)
      probs_BxGxRxLxS = dropout(cfg)(probs_BxGxRxLxS, deterministic=not train)
      return jnp.einsum("bgrls,bgsk->bgrlk", probs_BxGxRxLxS.astype(v_BxGxSxK.dtype), v_BxGxSxK)

    def visible(q_pos, k_pos):
      """Which keys each query sees: causal, and within the layer's window if it has one."""
      seen = k_pos <= q_pos
      if window > 0:
        seen = seen & (k_pos > q_pos - window)
      elif window < 0:
        seen = seen & ((layer_window == 0) | (k_pos > q_pos - layer_window))
      return seen

    if cfg.attention_impl != "einsum":
      out_BxLxHxK, cache = self.fused(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, positions_BxL, cache,
                                      visible)
      return self.project_out(out_BxLxHxK, train), cache
    if cache is None:
      k_BxGxSxK, v_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3), v_BxSxGxK.transpose(0, 2, 1, 3)
      # Causal: query t sees keys 0..t. With model.attention_block = C, queries go in blocks
      # of C rows and each block computes scores only for the keys up to its last row, so the
      # all-masked upper triangle is skipped: 5/8 of the score work for 4 blocks. With a
      # window of at most W for this layer (the widest of a scanned block's layers), the keys
      # before its first row's window are skipped too.
      C = cfg.attention_block or L
      span = window
      if window < 0:  # The widest window of the scanned layers, unless one of them is full.
        span = 0 if 0 in cfg.layer_windows else max(cfg.layer_windows)
      outs = []
      for start in range(0, L, C):
        stop = min(start + C, L)
        first = max(start - span + 1, 0) if span else 0
        visible_LxS = visible(jnp.arange(start, stop)[:, None], jnp.arange(first, stop)[None, :])
        outs.append(attend(q_BxGxRxLxK[:, :, :, start:stop], k_BxGxSxK[:, :, first:stop],
                           v_BxGxSxK[:, :, first:stop], visible_LxS))
      out_BxGxRxLxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    else:
      # Write the new keys/values (k_BxSxGxK holds the L new ones here) at their positions,
      # then attend over every slot up to each query's own position: later slots are stale or
      # empty and stay masked.
      cache = cache.write(positions_BxL, k_BxSxGxK, v_BxSxGxK)
      S = cache.k_BxGxSxK.shape[2]
      visible_BxLxS = visible(positions_BxL[:, :, None], jnp.arange(S)[None, None, :])
      out_BxGxRxLxK = attend(q_BxGxRxLxK, cache.k_BxGxSxK, cache.v_BxGxSxK,
                             visible_BxLxS[:, None, None])
    out_BxLxGxRxK = out_BxGxRxLxK.transpose(0, 3, 1, 2, 4)
    return self.project_out(out_BxLxGxRxK.reshape(B, L, H, K), train), cache

  def project_out(self, out_BxLxHxK: jax.Array, train: bool) -> jax.Array:
    cfg = self.cfg
    out_BxLxD = Linear(
        (cfg.d_model,), in_dims=2,
        kernel_init=out_init(cfg, (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        bias_init=_zeros((axes.EMBED,)), name=ATTN_OUT, use_bias=cfg.bias,
        dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])(out_BxLxHxK)
    return dropout(cfg)(out_BxLxD, deterministic=not train)

  def fused(self, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, positions_BxL, cache, visible):
    """Attention through jaxlm.attention's kernels (model.attention_impl), same math as the
    einsum path: causal, the layer's window (`visible`), and over the KV cache when decoding."""
    window, impl = self.window, self.cfg.attention_impl
    scale = 1.0 / self.cfg.attention_divisor
    if cache is None:
      if window >= 0:  # One static window (0 = full): the kernel's own causal mask.
        return attention.fused(impl, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, scale=scale,
                               window=window), None
      pos_L = jnp.arange(q_BxLxHxK.shape[1])  # Scanned layers' traced window: a mask.
      return attention.fused(impl, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, scale=scale,
                             mask_BxLxS=visible(pos_L[:, None], pos_L[None, :])[None]), None
    cache = cache.write(positions_BxL, k_BxSxGxK, v_BxSxGxK)
    S = cache.k_BxGxSxK.shape[2]
    visible_BxLxS = visible(positions_BxL[:, :, None], jnp.arange(S)[None, None, :])
    out_BxLxHxK = attention.fused(impl, q_BxLxHxK, cache.k_BxGxSxK.transpose(0, 2, 1, 3),
                                  cache.v_BxGxSxK.transpose(0, 2, 1, 3), scale=scale,
                                  mask_BxLxS=visible_BxLxS)
    return out_BxLxHxK, cache


class MLP(nn.Module):
  """GELU MLP (fc -> gelu -> proj), SwiGLU (silu(gate) * fc -> proj) or squared ReLU
  (fc -> relu^2 -> proj), as model.mlp says."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    dense = dict(use_bias=cfg.bias, dtype=DTYPES[cfg.dtype],
                 param_dtype=DTYPES[cfg.param_dtype])
    h_BxLxF = Linear((cfg.ff_dim,), kernel_init=hidden_init(cfg, (axes.EMBED, axes.MLP)),
                     bias_init=_zeros((axes.MLP,)), name=MLP_IN, **dense)(x_BxLxD)
    if cfg.mlp == "swiglu":
      # Shazeer 2020: a SiLU-gated linear unit; `fc` is LLaMA's up projection.
      gate_BxLxF = Linear((cfg.ff_dim,), kernel_init=hidden_init(cfg, (axes.EMBED, axes.MLP)),
                          bias_init=_zeros((axes.MLP,)), name=MLP_GATE, **dense)(x_BxLxD)
      h_BxLxF = nn.silu(gate_BxLxF) * h_BxLxF
    elif cfg.mlp == "relu2":
      # So et al. 2021 (Primer), as modded-nanogpt: relu(x)^2, the same two matrices as gelu.
      h_BxLxF = jnp.square(nn.relu(h_BxLxF))
    else:
      h_BxLxF = nn.gelu(h_BxLxF, approximate=True)  # GPT-2 uses the tanh approximation.
    out_BxLxD = Linear((cfg.d_model,), kernel_init=out_init(cfg, (axes.MLP, axes.EMBED)),
                       bias_init=_zeros((axes.EMBED,)), name=MLP_OUT, **dense)(h_BxLxF)
    return dropout(cfg)(out_BxLxD, deterministic=not train)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

  Returns (x, cache): the (carry, per-layer output) signature that `nn.scan` expects, with the
  updated LayerCache when decoding and None otherwise. `window` and `layer_window` are the
  attention's (CausalSelfAttention says what they mean).
  """
  cfg: ModelConfig
  train: bool = False
  window: int = 0

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, cache: LayerCache | None = None,
               positions_BxL: jax.Array | None = None,
               layer_window: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    cfg, dtype = self.cfg, x_BxLxD.dtype
    h_BxLxD = layer_norm(cfg, ATTN_NORM)(x_BxLxD).astype(dtype)
    attn_BxLxD, cache = CausalSelfAttention(cfg, window=self.window, name=ATTN)(
        h_BxLxD, train=self.train, positions_BxL=positions_BxL, cache=cache,
        layer_window=layer_window)
    x_BxLxD = x_BxLxD + attn_BxLxD
    h_BxLxD = layer_norm(cfg, MLP_NORM)(x_BxLxD).astype(dtype)
    x_BxLxD = x_BxLxD + MLP(cfg, name=MLP_SUBLAYER)(h_BxLxD, train=self.train)
    return x_BxLxD, cache


class DecoderLM(nn.Module):
  """A decoder-only transformer LM (GPT-2 or LLaMA, by ModelConfig): tokens -> float32 logits.

  tokens_BxL -> logits_BxLxV; with a cache, -> (logits_BxLxV, updated cache).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, train: bool = False,
               positions_BxL: jax.Array | None = None,
               cache: Cache | None = None) -> jax.Array | tuple[jax.Array, Cache]:
    """Without `cache`: the training forward pass (positions 0..L-1 unless given).

    With `cache` (from `init_cache` or a previous call) and `positions_BxL` (each token's
    position, which is also its cache slot; must be < block_size): writes the tokens' keys and
    values into the cache and returns the logits and the new cache. Queries see every slot up
    to their own position, so a prompt can be fed in one call or in pieces.
    """
    cfg = self.cfg
    L = tokens_BxL.shape[1]
    if L > cfg.block_size:
      raise JaxlmError(f"sequence length {L} exceeds model.block_size={cfg.block_size}")
    if cache is not None and positions_BxL is None:
      raise JaxlmError("decoding with a cache needs positions_BxL (each token's position)")
    # Embedding lookups are free, so the tables are kept (and read) in float32.
    wte = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32,
                   param_dtype=DTYPES[cfg.param_dtype],
                   embedding_init=_init(INIT_STD, (axes.VOCAB, axes.EMBED)), name=TOKEN_EMBED)
    if cfg.position == "rope":
      x_BxLxD = wte(tokens_BxL)  # Positions enter inside attention instead.
    else:
      wpe = nn.Embed(cfg.block_size, cfg.d_model, dtype=jnp.float32,
                     param_dtype=DTYPES[cfg.param_dtype],
                     embedding_init=_init(INIT_STD, (None, axes.EMBED)), name=POSITION_EMBED)
      if positions_BxL is None:
        x_BxLxD = wte(tokens_BxL) + wpe(jnp.arange(L))[None]
      else:
        x_BxLxD = wte(tokens_BxL) + wpe(positions_BxL)
    x_BxLxD = dropout(cfg)(x_BxLxD, deterministic=not train)
    x_BxLxD = x_BxLxD.astype(DTYPES[cfg.dtype])
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # One traced block whatever the depth, so compile time stays flat in n_layer. Params
      # gain a leading `layers` axis: h/attn/query/kernel is [N, D, H, K]; so does the cache.
      # Layers whose windows differ share the traced block: each reads its window from a
      # scanned [N] array instead (a static window when all layers have the same one).
      window = cfg.scan_window
      windows_N = jnp.asarray(cfg.layer_windows, jnp.int32) if window < 0 else None
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                      "dropout": True}, in_axes=(0, nn.broadcast, 0), length=cfg.n_layer,
                      metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      x_BxLxD, cache = stack(cfg, train=train, window=window, name=BLOCKS)(
          x_BxLxD, cache, positions_BxL, windows_N)
    else:
      layer_caches = []
      for i in range(cfg.n_layer):
        x_BxLxD, layer_cache = block(cfg, train=train, window=cfg.layer_windows[i],
                                     name=block_name(i))(
            x_BxLxD, None if cache is None else cache[i], positions_BxL)
        layer_caches.append(layer_cache)
      cache = None if cache is None else tuple(layer_caches)
    x_BxLxD = layer_norm(cfg, FINAL_NORM)(x_BxLxD)
    if cfg.tie_embeddings:
      # Weight tying (Press & Wolf, 2017): the output head reuses the token embedding.
      logits_BxLxV = wte.attend(x_BxLxD)
    else:
      logits_BxLxV = Linear((cfg.vocab_size,), use_bias=False, dtype=jnp.float32,
                            param_dtype=DTYPES[cfg.param_dtype],
                            kernel_init=_init(INIT_STD, (axes.EMBED, axes.VOCAB)),
                            name=HEAD)(x_BxLxD)
    if cfg.parametrization == "mup":
      # μP's readout multiplier (the mup package's MuReadout, and MuSharedReadout for a tied
      # head): the head keeps its init and Adam lr, and the logits shrink by base / width.
      logits_BxLxV = logits_BxLxV * cfg.logit_mult
    if cfg.logit_softcap:
      # Gemma 2 / modded-nanogpt: a smooth clip of the logits to (-cap, cap), in float32 (the
      # logits are float32 whatever model.dtype), so training, eval and sampling all see it.
      cap = cfg.logit_softcap
      logits_BxLxV = cap * jnp.tanh(logits_BxLxV.astype(jnp.float32) / cap)
    return logits_BxLxV if cache is None else (logits_BxLxV, cache)


def make_model(cfg: ModelConfig) -> DecoderLM:
  return DecoderLM(cfg)


def init_params(model: DecoderLM, rng: jax.Array) -> PyTree:
  """Boxed params ({'wte': {'embedding': Partitioned}, ...}); nn.unbox gives plain arrays."""
  tokens_1xL = jnp.zeros((1, model.cfg.block_size), dtype=jnp.int32)
  return model.init({"params": rng}, tokens_1xL, train=False)["params"]


def count_params(params: PyTree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def matmul_params(params: PyTree) -> int:
  """Parameters that take part in matmuls: all but the position embedding table."""
  return count_params(params) - count_params(params.get(POSITION_EMBED, {}))


def path_name(path: tuple[Any, ...]) -> str:
  """The "h_0/attn/query/kernel" name of a parameter's key path (jax.tree_util *_with_path).

  Only dict keys name parameters: the attribute keys that boxes add (nn.Partitioned's
  `.value`) are dropped, so boxed, abstract and plain trees give the same names.
  """
  return "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
