"""The model's config and vocabulary: ModelConfig, parameter path names, the KV-cache pytree.

Split from jaxlm/model.py (which re-exports every name here, so `model.ModelConfig` and
`model.HEAD` keep working) so that the modules read as two short files: what a model is
(here) and how it computes (model.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxlm.errors import JaxlmError

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu", "relu2")
# standard (GPT-2's init and 1/sqrt(head_dim) attention) | μP (jaxlm/mup.py: the rule table).
PARAMETRIZATIONS = ("sp", "mup")
FULL_WINDOW = "full"  # An entry of model.attention_window: plain causal attention in that layer.
# What the backward pass may keep from the forward pass of a block (the rest is recomputed):
# "full" keeps only the block's input, "dots" also keeps matmul outputs (cheap to store, the
# costly part to recompute).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Parameter path names: the modules of model.py take their `name=` from these, and checkpoints,
# jaxlm/hf.py's tensor map, the parameter report and the per-layer stats key on them. Renaming
# one would orphan every saved run, so they are written once, here.
TOKEN_EMBED = "wte"
POSITION_EMBED = "wpe"  # Only with model.position = learned.
BLOCKS = "h"  # The stacked blocks under scan_layers; unrolled, block i is block_name(i).
FINAL_NORM = "ln_f"
HEAD = "lm_head"  # Only with model.tie_embeddings = False.
# Inside a block: h_0/ln_1, h_0/attn, h_0/ln_2, h_0/mlp.
ATTN_NORM = "ln_1"
ATTN = "attn"
MLP_NORM = "ln_2"
MLP_SUBLAYER = "mlp"
# Projections: h_0/attn/query, .../key_value, .../out; h_0/mlp/fc, .../gate, .../proj.
QUERY = "query"
KEY_VALUE = "key_value"
ATTN_OUT = "out"
MLP_IN = "fc"  # LLaMA's up projection.
MLP_GATE = "gate"  # SwiGLU only.
MLP_OUT = "proj"
# model.qk_norm: the RMSNorms of queries and keys over the head dim, h_0/attn/query_norm/scale.
QUERY_NORM = "query_norm"
KEY_NORM = "key_norm"


def block_name(i: int) -> str:
  """The name of block i when the blocks are unrolled: h_0, h_1, ..."""
  return f"{BLOCKS}_{i}"


def block_index(name: str) -> int | None:
  """i for the name block_name(i); None for any other name."""
  digits = name.removeprefix(f"{BLOCKS}_")
  return int(digits) if digits != name and digits.isascii() and digits.isdigit() else None


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
  bias: bool = True  # Biases in linear layers and LayerNorms.
  tie_embeddings: bool = True
  norm: str = "layernorm"  # layernorm | rmsnorm.
  norm_eps: float = 1e-5
  position: str = "learned"  # learned (a wpe table) | rope (rotary, no parameters).
  rope_theta: float = 10000.0  # RoPE base: the longest rotation wavelength is ~2*pi*theta.
  # gelu (fc -> GELU -> proj) | swiglu (silu(gate) * fc -> proj) | relu2 (fc -> relu^2 -> proj).
  mlp: str = "gelu"
  dtype: str = "float32"  # compute dtype of matmuls; softmax, logits and loss always run in f32.
  param_dtype: str = "float32"
  remat: str = "none"  # Recompute activations in the backward pass: none | full | dots.
  # Dropout masks from a counter hash fused into the masked op (kernels.HashDropout) instead
  # of jax.random.bernoulli; train.dropout_rng = "hash" sets it.
  hash_dropout: bool = False
  scan_layers: bool = False  # One scanned block (params stacked on a `layers` axis).
  attention_block: int = 0  # Training attention in query blocks of this many rows; 0 = one.
  qk_norm: bool = False  # RMSNorm of queries and keys over the head dim, before RoPE.
  logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off.
  zero_init_proj: bool = False  # Attention-out and MLP-out kernels start at zero.
  # Per-layer sliding windows, cycled over the layers: "" = all full causal attention, else
  # comma-separated entries, each an integer W >= 1 (a query at t sees keys t-W+1 .. t) or
  # "full"; see layer_windows.
  attention_window: str = ""
  # The attention kernel, already resolved for this platform (jaxlm.attention): einsum (jaxlm's
  # own path) | xla | cudnn | splash; the config's "auto" never reaches here.
  attention_impl: str = "einsum"
  # μP (Yang et al. 2021, Tensor Programs V; jaxlm/mup.py has the rules and the optimizer
  # side). The model side is here: hidden kernels init with std / sqrt(width_mult), logits
  # times 1 / width_mult, attention scores times sqrt(base_head_dim) / head_dim. The base
  # head dim 0 = mup_base_width / n_head (the base model has as many heads as this one).
  parametrization: str = "sp"
  mup_base_width: int = 0
  mup_base_head_dim: int = 0

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
    for name, choices in (("norm", NORMS), ("position", POSITIONS), ("mlp", MLPS)):
      if getattr(self, name) not in choices:
        fail(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
    if self.norm_eps <= 0:
      fail(f"model.norm_eps must be > 0, got {self.norm_eps}")
    if self.position == "rope" and (self.head_dim % 2 or self.rope_theta <= 0):
      fail(f"rope needs an even head dim (d_model / n_head = {self.head_dim}) and "
           f"model.rope_theta > 0 (got {self.rope_theta})")
    if self.attention_block < 0:
      fail(f"model.attention_block must be >= 0 (0 = off), got {self.attention_block}")
    if self.remat not in REMAT_POLICIES:
      fail(f"model.remat={self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    if not self.logit_softcap >= 0:  # Also catches NaN.
      fail(f"model.logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
    parse_windows(self.attention_window, self.n_layer)  # Raises on a bad entry.
    if self.attention_impl not in ("einsum", "xla", "cudnn", "splash"):
      fail(f"model.attention_impl={self.attention_impl!r} is not one of einsum, xla, cudnn, "
           "splash (the config's auto resolves to one of them)")
    self._check_mup(fail)

  def _check_mup(self, fail):
    """μP's base shapes: the rule is 1 <= mup_base_width <= d_model (width_mult = d_model /
    mup_base_width, any ratio >= 1: μP transfers from a small base up) and a whole base head
    dim (mup_base_width divisible by n_head, or model.mup_base_head_dim given) <= head_dim."""
    if self.parametrization not in PARAMETRIZATIONS:
      fail(f"model.parametrization={self.parametrization!r} is not one of "
           f"{', '.join(PARAMETRIZATIONS)}")
    if self.parametrization != "mup":
      return
    base, base_k = self.mup_base_width, self.mup_base_head_dim
    if not 1 <= base <= self.d_model:
      fail(f"model.parametrization=mup needs 1 <= model.mup_base_width <= model.d_model="
           f"{self.d_model} (the width the hyperparameters were tuned at; width_mult = "
           f"d_model / mup_base_width must be >= 1), got {base}")
    if not base_k and base % self.n_head:
      fail(f"model.mup_base_width={base} is not divisible by model.n_head={self.n_head}: the "
           "base head dim is mup_base_width / n_head; pick a multiple of n_head or set "
           "model.mup_base_head_dim")
    if not 0 <= base_k <= self.head_dim:
      fail(f"model.mup_base_head_dim={base_k} must be in [0, head_dim={self.head_dim}] (0 = "
           "mup_base_width / n_head)")

  @property
  def width_mult(self) -> float:
    """μP's width multiplier d_model / mup_base_width; 1 under sp."""
    return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

  @property
  def base_head_dim(self) -> int:
    if self.parametrization != "mup":
      return self.head_dim
    return self.mup_base_head_dim or self.mup_base_width // self.n_head

  @property
  def hidden_init_mult(self) -> float:
    """Init std multiplier of the hidden kernels: μP's variance 1 / fan_in, relative to the
    base width (so exactly 1.0 there and under sp)."""
    return 1.0 / math.sqrt(self.width_mult)

  @property
  def logit_mult(self) -> float:
    """μP's output multiplier base_width / width (the mup package's MuReadout); 1 under sp."""
    return 1.0 / self.width_mult

  @property
  def attention_divisor(self) -> float:
    """Scores are q.k / this: sqrt(head_dim) under sp; under μP head_dim / sqrt(base_head_dim)
    (1/d attention), written as sqrt(K) * (sqrt(K) / sqrt(K_base)) so that it is exactly
    sqrt(K) at the base head dim (bitwise the sp model)."""
    k = self.head_dim
    if self.parametrization != "mup":
      return math.sqrt(k)
    return math.sqrt(k) * (math.sqrt(k) / math.sqrt(self.base_head_dim))

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def ff_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def layer_windows(self) -> tuple[int, ...]:
    """Each layer's attention window W (0 = full causal attention), model.attention_window
    cycled over the n_layer layers."""
    return parse_windows(self.attention_window, self.n_layer)

  @property
  def scan_window(self) -> int:
    """Under scan_layers, the window every layer has (0 = full) or, if they differ, -1: the
    scanned block then reads its layer's window from the scanned per-layer array."""
    windows = set(self.layer_windows)
    return windows.pop() if len(windows) == 1 else -1


def parse_windows(spec: str, n_layer: int) -> tuple[int, ...]:
  """model.attention_window -> one window per layer (0 = full); JaxlmError on a bad entry.

  "" is full attention everywhere; "128,128,128,full" gives layers 0-2 a 128-token window,
  layer 3 full attention, layers 4-6 windows again, and so on.
  """
  if not spec.strip():
    return (0,) * n_layer
  entries = []
  for entry in spec.split(","):
    entry = entry.strip()
    if entry == FULL_WINDOW:
      entries.append(0)
    elif entry.isascii() and entry.isdigit() and int(entry) >= 1:
      entries.append(int(entry))
    else:
      raise JaxlmError(f"invalid model config: model.attention_window={spec!r}: each "
                       f"comma-separated entry must be an integer window >= 1 or "
                       f"{FULL_WINDOW!r}, got {entry!r}")
  return tuple(entries[i % len(entries)] for i in range(n_layer))


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one attention layer for S = block_size slots (slot s = position s).

  Heads come before slots so that both attention matmuls read the cache as it is laid out;
  with slots first, XLA transposed every layer's cache for every decoded token
  (experiments/sampling_bench/README.md has the measurement).
  """
  k_BxGxSxK: jax.Array
  v_BxGxSxK: jax.Array

  def write(self, positions_BxL: jax.Array, k_BxLxGxK: jax.Array,
            v_BxLxGxK: jax.Array) -> LayerCache:
    """The cache with L new keys and values written at their rows' positions."""
    rows_Bx1 = jnp.arange(positions_BxL.shape[0])[:, None]
    return LayerCache(k_BxGxSxK=self.k_BxGxSxK.at[rows_Bx1, :, positions_BxL].set(k_BxLxGxK),
                      v_BxGxSxK=self.v_BxGxSxK.at[rows_Bx1, :, positions_BxL].set(v_BxLxGxK))


# One LayerCache per block (h_0 first); with scan_layers, one LayerCache whose arrays carry a
# leading layers axis (NxBxGxSxK), the way nn.scan slices it.
Cache = tuple[LayerCache, ...] | LayerCache


def init_cache(cfg: ModelConfig, batch_size: int) -> Cache:
  """An empty (all-zero) cache in the compute dtype; nothing in it is visible until written."""
  shape = (batch_size, cfg.kv_heads, cfg.block_size, cfg.head_dim)
  if cfg.scan_layers:
    zeros_N = lambda: jnp.zeros((cfg.n_layer, *shape), DTYPES[cfg.dtype])
    return LayerCache(k_BxGxSxK=zeros_N(), v_BxGxSxK=zeros_N())
  zeros = lambda: jnp.zeros(shape, DTYPES[cfg.dtype])
  return tuple(LayerCache(k_BxGxSxK=zeros(), v_BxGxSxK=zeros()) for _ in range(cfg.n_layer))
