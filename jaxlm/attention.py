"""Which attention kernel a model runs (model.attention_impl), and the fused kernels themselves.

- "einsum": jaxlm's own path in model.py: head-major einsums, f32 scores and softmax, query
  blocks that skip the masked triangle (model.attention_block), attention dropout. It is the
  fastest on a CPU, and the only one with attention dropout.
- "xla": jax.nn.dot_product_attention's XLA implementation (the same math, any backend).
- "cudnn": cuDNN's fused flash attention through jax.nn.dot_product_attention (NVIDIA GPUs;
  bfloat16/float16, head dim a multiple of 8 up to 128, or 256 from Hopper on).
- "splash": the Pallas splash-attention kernel of jax.experimental (TPUs; head dim and block
  size multiples of 128).
- "auto" (the default): cudnn on an NVIDIA GPU and splash on a TPU when the model allows them,
  else xla there; einsum on a CPU. `resolve` says in one log line what it picked and why.

The KV-cache decode path runs every fused choice through the XLA kernel with an explicit mask:
decode attends one new query over a cache whose valid length differs per row, which the fused
kernels' causal masks do not describe; it is the same math, so samples match training.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging

from jaxlm.errors import JaxlmError

IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
FUSED = ("xla", "cudnn", "splash")
CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_BLOCK = 128  # Splash tiles queries and keys in blocks of this many positions.


@dataclasses.dataclass(frozen=True)
class Platform:
  """What the attention choice depends on: the backend and, on NVIDIA GPUs, the generation."""
  backend: str  # jax.default_backend(): "cpu", "gpu" or "tpu".
  nvidia: bool = False
  compute_capability: float = 0.0  # e.g. 9.0 for Hopper; 0 when unknown.

  @staticmethod
  def current() -> Platform:
    backend = jax.default_backend()
    if backend != "gpu":
      return Platform(backend)
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    cc = getattr(device, "compute_capability", "") or "0"
    try:
      capability = float(cc)
    except ValueError:
      capability = 0.0
    return Platform("gpu", nvidia=kind.startswith(("NVIDIA", "Tesla")) or capability > 0,
                    compute_capability=capability)


def resolve_dtype(value: str, platform: Platform | None = None) -> str:
  """model.dtype "auto": bfloat16 compute on GPUs and TPUs, float32 on CPUs (whose matmuls
  gain nothing from bfloat16); any other value is kept."""
  if value != "auto":
    return value
  platform = platform or Platform.current()
  return "float32" if platform.backend == "cpu" else "bfloat16"


def cudnn_problem(*, head_dim: int, dtype: str, dropout: float, mixed_windows: bool,
                  platform: Platform) -> str | None:
  """Why cuDNN's flash attention cannot run this model here, or None when it can."""
  if not platform.nvidia:
    return f"cuDNN attention needs an NVIDIA GPU; this machine's backend is {platform.backend}"
  if dtype not in CUDNN_DTYPES:
    return (f"cuDNN attention takes model.dtype bfloat16 or float16, not {dtype} "
            "(model.dtype=auto picks bfloat16 on a GPU)")
  max_dim = 256 if platform.compute_capability >= 9.0 else 128
  if head_dim % 8 or head_dim > max_dim:
    return (f"cuDNN attention takes a head dim that is a multiple of 8 up to {max_dim} on this "
            f"GPU; the model's is {head_dim} (d_model / n_head)")
  return _common_problem("cuDNN", dropout, mixed_windows)


def splash_problem(*, head_dim: int, block_size: int, dropout: float, mixed_windows: bool,
                   platform: Platform) -> str | None:
  """Why splash attention cannot run this model here, or None when it can."""
  if platform.backend != "tpu":
    return f"splash attention needs a TPU; this machine's backend is {platform.backend}"
  if head_dim % SPLASH_BLOCK or block_size % SPLASH_BLOCK:
    return (f"splash attention takes a head dim and block size that are multiples of "
            f"{SPLASH_BLOCK}; the model's are {head_dim} and {block_size}")
  return _common_problem("splash", dropout, mixed_windows)


def _common_problem(name: str, dropout: float, mixed_windows: bool) -> str | None:
  if dropout:
    return (f"{name} attention has no attention dropout (model.dropout={dropout}); use "
            "attention_impl=einsum or dropout 0")
  if mixed_windows:
    return (f"{name} attention takes one window per compiled layer; scanned layers with "
            "different attention windows need attention_impl=xla or einsum (or scan_layers off)")
  return None


def resolve(impl: str, *, head_dim: int, dtype: str, block_size: int, dropout: float,
            mixed_windows: bool, platform: Platform | None = None, log: bool = True) -> str:
  """The kernel `impl` stands for on this platform; an explicit choice that cannot run here is
  a one-line error, "auto" falls back (cudnn/splash -> xla) and logs why."""
  if impl not in IMPLS:
    raise JaxlmError(f"model.attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
  if impl in ("einsum", "xla"):
    return impl
  platform = platform or Platform.current()
  args = dict(head_dim=head_dim, dropout=dropout, mixed_windows=mixed_windows, platform=platform)
  if impl == "cudnn":
    if problem := cudnn_problem(dtype=dtype, **args) or probe_cudnn(head_dim, dtype):
      raise JaxlmError(f"model.attention_impl=cudnn: {problem}")
    return impl
  if impl == "splash":
    if problem := splash_problem(block_size=block_size, **args):
      raise JaxlmError(f"model.attention_impl=splash: {problem}")
    return impl
  # auto
  if platform.backend == "cpu":
    return "einsum"
  if platform.backend == "gpu" and platform.nvidia:
    picked, problem = "cudnn", (cudnn_problem(dtype=dtype, **args)
                                or probe_cudnn(head_dim, dtype))
  elif platform.backend == "tpu":
    picked, problem = "splash", splash_problem(block_size=block_size, **args)
  else:
    picked, problem = "xla", f"no fused kernel for backend {platform.backend}"
  if problem and picked != "xla":
    picked = "xla"
  if log:
    logging.info("attention: %s%s", picked, f" (auto fell back: {problem})" if problem else
                 " (auto)")
  return picked


@functools.cache  # Once per shape: model_config runs in several places.
def probe_cudnn(head_dim: int, dtype: str) -> str | None:
  """Lowers cuDNN attention's forward and backward for this head dim and dtype: None when
  they lower, else why not. The library's own checks (cuDNN version, GPU generation, shapes)
  run at lowering; this finds their answer before the model compiles, not in the middle."""
  q_BxLxHxK = jax.ShapeDtypeStruct((1, SPLASH_BLOCK, 1, head_dim), jnp.dtype(dtype))

  def loss(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn").sum()
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q_BxLxHxK, q_BxLxHxK, q_BxLxHxK)
  except Exception as e:  # Any failure means the same thing here: cuDNN cannot run it.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"cuDNN attention does not lower here ({type(e).__name__}: {first[:200]})"
  return None


def fused(impl: str, q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, *,
          scale: float, window: int = 0, mask_BxLxS: jax.Array | None = None) -> jax.Array:
  """softmax(scale q k^T) v, causal (and within `window` keys when > 0), or as `mask_BxLxS`
  says when given (the decode path, traced windows): [B, L, H, K] out.

  Scores, softmax and the weighted sum's accumulation run in float32 inside every kernel.
  """
  if mask_BxLxS is not None or impl == "xla":
    mask = None if mask_BxLxS is None else mask_BxLxS[:, None]
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask, scale=scale, is_causal=mask is None,
        local_window_size=(window - 1, 0) if window > 0 and mask is None else None,
        implementation="xla")
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, scale=scale, is_causal=True,
        local_window_size=(window - 1, 0) if window > 0 else None, implementation="cudnn")
  if impl == "splash":
    # Off a TPU (tests on a CPU) the kernel runs in Pallas' interpreter: same math, slowly.
    return _splash(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, scale=scale, window=window,
                   interpret=jax.default_backend() != "tpu")
  raise ValueError(f"not a fused attention: {impl!r}")


def _splash(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, *, scale: float,
            window: int, interpret: bool) -> jax.Array:
  """Splash attention, one example at a time (the kernel is per example, head-major)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  _, L, H, _ = q_BxLxHxK.shape
  G = k_BxSxGxK.shape[2]
  shape = (L, L)
  one = sm.LocalMask(shape, (window - 1, 0), offset=0) if window > 0 else sm.CausalMask(shape)
  block = min(SPLASH_BLOCK, L)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * H), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, interpret=interpret)
  # Splash takes one kv head per query head: grouped kv heads are repeated to the H queries.
  q_BxHxLxK = (q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype)).transpose(0, 2, 1, 3)
  k_BxHxSxK = jnp.repeat(k_BxSxGxK, H // G, axis=2).transpose(0, 2, 1, 3)
  v_BxHxSxK = jnp.repeat(v_BxSxGxK, H // G, axis=2).transpose(0, 2, 1, 3)
  out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK)
  return out_BxHxLxK.transpose(0, 2, 1, 3)
