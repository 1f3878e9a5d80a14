"""What the parameters are: per-tensor anatomy, memory and compute preflight, and drift from init.

Parameters are the numbers training moves: weights (kernels of the linear maps), biases (the
shifts added before an activation), embeddings and normalisation scales. Hyperparameters
(layers, widths, learning rate, batch size, temperature, top-k, top-p) are chosen by a person
and fix how many parameters there are and what they cost. `config_report` answers from a config
alone, through `jax.eval_shape`, so nothing is allocated; `run_report` adds, per tensor of a
trained run, its statistics and its drift from the random initialisation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxlm import axes, devices, metrics, runs, sharding
from jaxlm import build as build_lib
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError

PyTree = Any
GIB = 2**30
KINDS = ("weight", "bias", "embedding", "norm scale")
# The last name on a parameter's path says what it is. LayerNorm's shift is a bias too.
KIND_OF_NAME = {"kernel": "weight", "bias": "bias", "embedding": "embedding",
                "scale": "norm scale"}

# Hyperparameters that fix the numbers of the report, and some that do not (they change what
# training does with the parameters, not how many there are or what a step costs).
SIZE_HYPERPARAMETERS = (
    "model.family", "model.norm", "model.position", "model.mlp",
    "model.n_layer", "model.n_head", "model.n_kv_head", "model.d_model", "model.d_ff",
    "model.block_size", "model.vocab_size", "model.bias", "model.tie_embeddings", "model.dtype",
    "model.param_dtype", "model.remat", "model.scan_layers", "optim.name", "train.batch_size",
    "train.grad_accum", "train.steps",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.rules")
OTHER_HYPERPARAMETERS = (
    "seed", "model.dropout", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.b1",
    "optim.b2", "optim.weight_decay", "optim.grad_clip", "sample.temperature", "sample.top_k",
    "sample.top_p")

PARAM_FORMULA = (
    "V·D + p·T·D [wte, wpe] + N·(2·D [norm scales] + D·(H+2G)·K + H·K·D + m·D·F [kernels] "
    "+ b·((H+2G)·K + D + (m-1)·F + D) + b·l·2·D [biases]) + D + b·l·D [ln_f] + (untied: D·V); "
    "p = 1 for learned positions (0 for rope), m = 2 for gelu (3 for swiglu), "
    "l = 1 for layernorm (0 for rmsnorm, which has no shift)")
FLOPS_CONVENTION = (
    "6·N + 12·n_layer·d_model·block_size (forward + backward; N = parameters in matmuls, i.e. "
    "all but the position embeddings, a tied embedding counted once, as nanoGPT's "
    "estimate_mfu; the second term is the attention scores and weighted values)")


# ---------------------------------------------------------------------------------------------
# Anatomy: one row per parameter tensor.
# ---------------------------------------------------------------------------------------------

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


def _is_box(x: Any) -> bool:
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
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
    names = tuple(leaf.names) if _is_box(leaf) else None
    value = leaf.value if _is_box(leaf) else leaf
    rows.append(Tensor(model_lib.path_name(path), tuple(int(d) for d in value.shape),
                       np.dtype(value.dtype).name, names))
  return sorted(rows, key=lambda t: layer_sort_key(t.layer))  # Stable: keeps order in a layer.


def formula_param_counts(mcfg: model_lib.ModelConfig) -> dict[str, int]:
  """Parameter counts by kind from the architecture alone (no flax tree); see PARAM_FORMULA.

  Letters: V vocab, T block_size, D d_model, N n_layer, H heads, G kv heads, K head dim,
  F d_ff, b = 1 with biases else 0, p = 1 with a learned position table, m = matrices in the
  MLP (2 for gelu, 3 for swiglu), l = 1 when the norms are LayerNorms (RMSNorm has no shift).
  """
  V, T, D, N = mcfg.vocab_size, mcfg.block_size, mcfg.d_model, mcfg.n_layer
  H, G, K, F = mcfg.n_head, mcfg.kv_heads, mcfg.head_dim, mcfg.ff_dim
  b = int(mcfg.bias)
  p = int(mcfg.position == "learned")
  m = 3 if mcfg.mlp == "swiglu" else 2
  ln = int(mcfg.norm == "layernorm")
  qkv = (H + 2 * G) * K  # Query heads plus one key and one value per kv head.
  counts = {
      "weight": N * (D * qkv + H * K * D + m * D * F) + (0 if mcfg.tie_embeddings else D * V),
      # Per block: q/k/v, attention out, fc (and gate), proj, and the shifts of the two norms.
      "bias": b * (N * (qkv + D + (m - 1) * F + D + ln * 2 * D) + ln * D),
      "embedding": V * D + p * T * D,
      "norm scale": N * 2 * D + D,
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


# ---------------------------------------------------------------------------------------------
# Memory and compute.
# ---------------------------------------------------------------------------------------------

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
  for leaf in jax.tree.leaves(tree, is_leaf=_is_box):
    value = leaf.value if _is_box(leaf) else leaf
    itemsize = np.dtype(value.dtype).itemsize
    total += math.prod(value.shape) * itemsize
    names = tuple(leaf.names) if _is_box(leaf) else None
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


# ---------------------------------------------------------------------------------------------
# The report for a config (no parameter is allocated).
# ---------------------------------------------------------------------------------------------

def _lookup(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def config_report(cfg: ml_collections.ConfigDict, *, n_devices: int, config_path: str = "",
                  device: str = "", peak_tflops: float = 0.0, device_memory_gib: float = 0.0,
                  mfu: float = 0.4) -> dict[str, Any]:
  """Everything `jaxlm params --config` prints, as a JSON-ready dict.

  Args:
    n_devices: devices of the target machine (the mesh and per-device numbers use it).
    device: a name from jaxlm.devices.DEVICES; fills peak_tflops and device_memory_gib when they
      are 0.
    peak_tflops: peak TFLOP/s of one device, for the step time at `mfu`; 0 = no estimate.
    device_memory_gib: memory of one device; 0 = no fit check.
  """
  config_lib.validate_config(cfg)
  if not 0.0 < mfu <= 1.0:
    raise JaxlmError(f"--mfu must be in (0, 1], got {mfu}")
  if device:
    known = devices.lookup(device)
    device = known.name
    peak_tflops = peak_tflops or known.peak_tflops
    device_memory_gib = device_memory_gib or known.memory_gib
  vocab_size, vocab_source = config_lib.resolve_vocab_size(cfg)
  recipe = build_lib.make_recipe(cfg, vocab_size)
  mcfg = recipe.mcfg
  warnings: list[str] = []

  # --- Anatomy ---------------------------------------------------------------------------------
  abstract_state = jax.eval_shape(
      functools.partial(step_lib.init_boxed_state, model=recipe.model, tx=recipe.tx),
      jax.random.key(0))
  rows = tensors(abstract_state.params)
  total = sum(t.count for t in rows)
  formula = formula_param_counts(mcfg)
  counted = count_by(rows, "kind")
  by_kind = {k: counted.get(k, 0) for k in KINDS} | {
      k: v for k, v in counted.items() if k not in KINDS}
  if formula["total"] != total:
    warnings.append(f"the analytic formula gives {formula['total']:,} parameters but the model "
                    f"has {total:,}: the formula is out of date with jaxlm/model.py")
  n_matmul = model_lib.matmul_params(nn.unbox(abstract_state.params))

  # --- Memory ----------------------------------------------------------------------------------
  rules = sharding.get_rules(cfg.mesh.rules)
  shape = sharding.mesh_shape(dict(cfg.mesh.items()), n_devices)
  mesh_sizes = dict(zip(axes.MESH_AXES, shape, strict=True))
  param_total, param_dev = state_bytes(abstract_state.params, rules, mesh_sizes)
  opt_total, opt_dev = state_bytes(abstract_state.opt_state, rules, mesh_sizes)
  # Gradients have the params' shapes and shardings; accumulating microbatches in a scan keeps
  # a running sum beside each microbatch's gradients.
  grad_copies = 2 if cfg.train.grad_accum > 1 else 1
  batch_ways = sharding.logical_ways(axes.BATCH, rules, mesh_sizes)
  micro_batch = cfg.train.batch_size // cfg.train.grad_accum
  if micro_batch % batch_ways:
    warnings.append(f"train.batch_size={cfg.train.batch_size} (/ grad_accum "
                    f"{cfg.train.grad_accum}) is not divisible by the {batch_ways}-way batch "
                    f"split of mesh {mesh_sizes}: `jaxlm train` would refuse it")
  batch_per_device = max(micro_batch // batch_ways, 1)
  tensor_ways = sharding.logical_ways(axes.HEADS, rules, mesh_sizes)
  act_per_token = activation_bytes_per_token(mcfg, tensor_ways=tensor_ways)
  act_dev = int(act_per_token * batch_per_device * mcfg.block_size)
  act_total = int(activation_bytes_per_token(mcfg) * micro_batch * mcfg.block_size)
  per_device = param_dev + opt_dev + grad_copies * param_dev + act_dev
  fits = None
  if device_memory_gib:
    available = device_memory_gib * GIB
    fits = per_device <= available
    if not fits:
      warnings.append(
          f"does not fit: needs {per_device / GIB:.2f} GiB per device (params "
          f"{param_dev / GIB:.2f} + optimizer {opt_dev / GIB:.2f} + gradients "
          f"{grad_copies * param_dev / GIB:.2f} + activations {act_dev / GIB:.2f}) but a device "
          f"has {device_memory_gib:g} GiB: {(per_device - available) / GIB:.2f} GiB short. "
          "Shard params and optimizer state over more devices (mesh.fsdp with rules fsdp), use "
          "a smaller train.batch_size per device or more train.grad_accum, or a larger device")
    elif per_device > 0.9 * available:
      warnings.append(f"tight: needs {per_device / GIB:.2f} of {device_memory_gib:g} GiB per "
                      "device; XLA's temporaries may not fit in what is left")

  # --- Compute ---------------------------------------------------------------------------------
  flops_token = metrics.flops_per_token(n_matmul, mcfg.n_layer, mcfg.d_model, mcfg.block_size)
  tokens_per_step = cfg.train.batch_size * mcfg.block_size
  flops_step = flops_token * tokens_per_step
  step_time = (flops_step / (n_devices * peak_tflops * 1e12 * mfu)) if peak_tflops else None

  resolved = {"model.vocab_size": mcfg.vocab_size, "model.d_ff": mcfg.ff_dim,
              "model.n_kv_head": mcfg.kv_heads,
              **{f"model.{k}": v for k, v in config_lib.resolved_architecture(cfg.model).items()}}
  return {
      "config": config_path,
      "hyperparameters": {k: resolved.get(k, _lookup(cfg, k)) for k in SIZE_HYPERPARAMETERS},
      "other_hyperparameters": {k: _lookup(cfg, k) for k in OTHER_HYPERPARAMETERS},
      "vocab_source": vocab_source,
      "tensors": [{"path": t.path, "shape": list(t.shape), "dtype": t.dtype, "count": t.count,
                   "kind": t.kind, "layer": t.layer,
                   "logical_axes": None if t.logical_axes is None else list(t.logical_axes)}
                  for t in rows],
      "params": {
          "total": total, "by_kind": by_kind,
          "by_layer": count_by_layer(rows),
          "matmul": n_matmul,
          "formula": PARAM_FORMULA, "formula_total": formula["total"],
          "formula_by_kind": {k: formula[k] for k in KINDS},
          "formula_per_block": formula_block_params(mcfg),
      },
      "memory": {
          "devices": n_devices, "mesh": mesh_sizes, "rules": cfg.mesh.rules,
          "optimizer": cfg.optim.name,
          "optimizer_state_per_param": round(opt_total / param_total, 3) if param_total else 0,
          "batch_per_device": batch_per_device,
          "activation_bytes_per_token": act_per_token,
          "remat": mcfg.remat,
          "bytes": {"params": {"total": param_total, "per_device": param_dev},
                    "optimizer_state": {"total": opt_total, "per_device": opt_dev},
                    "gradients": {"total": grad_copies * param_total,
                                  "per_device": grad_copies * param_dev},
                    # "total": the whole microbatch on one unsharded device.
                    "activations": {"total": act_total, "per_device": act_dev},
                    "total": {"per_device": per_device}},
          "device_memory_gib": device_memory_gib or None,
          "fits": fits,
      },
      "compute": {
          "flops_per_token": flops_token, "convention": FLOPS_CONVENTION,
          "tokens_per_step": tokens_per_step, "flops_per_step": flops_step,
          "device": device or None, "peak_tflops_per_device": peak_tflops or None,
          "mfu": mfu, "step_time_sec": step_time,
          "train_time_sec": None if step_time is None else step_time * cfg.train.steps,
      },
      "warnings": warnings,
  }


# ---------------------------------------------------------------------------------------------
# Drift from the random initialisation of a trained run.
# ---------------------------------------------------------------------------------------------

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
    t = Tensor(path, theta.shape, np.dtype(x.dtype).name, None)
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

  rows.sort(key=lambda r: layer_sort_key(r["layer"]))
  by_layer = {name: summary(groups["layer"][name])
              for name in sorted(groups["layer"], key=layer_sort_key)}
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
  report = drift_report(run.params, initial_params(run.model, run.cfg.seed),
                        scanned=run.model.cfg.scan_layers)
  report.update(workdir=workdir, step=int(run.step), seed=run.cfg.seed,
                total=sum(r["count"] for r in report["tensors"]), warnings=[])
  if run.cfg.train.init_from:
    report["warnings"].append(
        f"this run started from train.init_from={run.cfg.train.init_from!r}: drift is measured "
        f"from the random init of seed {run.cfg.seed}, not from those params")
  return report


# ---------------------------------------------------------------------------------------------
# Text and plot.
# ---------------------------------------------------------------------------------------------

def format_bytes(n: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def format_seconds(seconds: float) -> str:
  if seconds < 1e-3:
    return f"{1e6 * seconds:.3g} µs"
  if seconds < 1.0:
    return f"{1e3 * seconds:.3g} ms"
  return f"{seconds:.3g} s" if seconds < 60 else metrics.format_duration(seconds)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]], right: set[int]) -> list[str]:
  cells = [tuple(str(c) for c in row) for row in [header, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for row in cells:
    padded = [c.rjust(w) if i in right else c.ljust(w)
              for i, (c, w) in enumerate(zip(row, widths, strict=True))]
    lines.append(("  " + "  ".join(padded)).rstrip())
  return lines


def format_config_text(report: dict[str, Any]) -> str:
  """The human-readable form of `config_report`."""
  p, mem, comp = report["params"], report["memory"], report["compute"]
  hp = report["hyperparameters"]
  total = p["total"]
  out = [f"jaxlm params {report['config'] or '(config)'}: {total:,} parameters, "
         f"{hp['model.n_layer']} layers x d_model {hp['model.d_model']}, "
         f"{hp['model.n_head']} heads, block {hp['model.block_size']}, vocab "
         f"{hp['model.vocab_size']}", ""]

  out.append("Hyperparameters: chosen by a person; these fix every number below")
  notes = {"model.vocab_size": report["vocab_source"], "model.d_ff": "resolved",
           "model.n_kv_head": "resolved"}
  out += _table(("name", "value", ""), [(k, v, notes.get(k, "")) for k, v in hp.items()],
                right=set())
  out.append("")

  out.append("Parameters: learned; they start random and training moves them "
             f"({len(report['tensors'])} tensors)")
  out += _table(
      ("path", "shape", "dtype", "count", "kind", "logical axes"),
      [(t["path"], " x ".join(map(str, t["shape"])), t["dtype"], f"{t['count']:,}", t["kind"],
        ", ".join(str(a) for a in t["logical_axes"]) if t["logical_axes"] else "-")
       for t in report["tensors"]], right={3})
  out.append("")

  out.append("By kind")
  rows = [(k, f"{v:,}", f"{100 * v / total:.2f}%", f"{p['formula_by_kind'].get(k, 0):,}")
          for k, v in p["by_kind"].items()]
  rows.append(("total", f"{total:,}", "100.00%", f"{p['formula_total']:,}"))
  out += _table(("kind", "count", "share", "formula"), rows, right={1, 2, 3})
  match = "matches" if p["formula_total"] == total else "DOES NOT MATCH"
  out.append(f"  analytic formula {match} the model: {p['formula']}")
  out.append("")

  out.append(f"By layer (formula per block: {p['formula_per_block']:,})")
  out += _table(("layer", "count", "share"),
                [(k, f"{v:,}", f"{100 * v / total:.2f}%") for k, v in p["by_layer"].items()],
                right={1, 2})
  out.append("")

  b = mem["bytes"]
  mesh = " ".join(f"{k}={v}" for k, v in mem["mesh"].items())
  out.append(f"Memory on {mem['devices']} device(s), mesh {mesh}, rules {mem['rules']}, "
             f"{mem['batch_per_device']} sequence(s) of {hp['model.block_size']} tokens per "
             "device per microbatch")
  out += _table(
      ("", "total", "per device"),
      [(f"params ({hp['model.param_dtype']})", format_bytes(b["params"]["total"]),
        format_bytes(b["params"]["per_device"])),
       (f"optimizer state ({mem['optimizer']}: {mem['optimizer_state_per_param']:g} x params)",
        format_bytes(b["optimizer_state"]["total"]),
        format_bytes(b["optimizer_state"]["per_device"])),
       ("gradients", format_bytes(b["gradients"]["total"]),
        format_bytes(b["gradients"]["per_device"])),
       (f"activations (estimate, remat {mem['remat']})", format_bytes(b["activations"]["total"]),
        format_bytes(b["activations"]["per_device"])),
       ("total", "", format_bytes(b["total"]["per_device"]))], right={1, 2})
  out.append(f"  activations: {mem['activation_bytes_per_token']:,.0f} bytes per token kept for "
             "the backward pass (the formula is in params.activation_bytes_per_token); their "
             "total is one whole microbatch on one device")
  if mem["device_memory_gib"]:
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    out.append(f"  device memory {mem['device_memory_gib']:g} GiB: {verdict}")
  out.append("")

  out.append("Compute")
  out.append(f"  FLOPs per token  {comp['flops_per_token']:.4g} = 6·{p['matmul']:,} + "
             f"12·{hp['model.n_layer']}·{hp['model.d_model']}·{hp['model.block_size']}")
  out.append(f"                   convention: {comp['convention']}")
  out.append(f"  tokens per step  {comp['tokens_per_step']:,} (train.batch_size "
             f"{hp['train.batch_size']} x block_size {hp['model.block_size']})")
  out.append(f"  FLOPs per step   {comp['flops_per_step']:.4g}")
  if comp["step_time_sec"] is not None:
    on = f" ({comp['device']})" if comp["device"] else ""
    out.append(f"  step time        {format_seconds(comp['step_time_sec'])} at MFU "
               f"{100 * comp['mfu']:g}% on {mem['devices']} device(s) of "
               f"{comp['peak_tflops_per_device']:g} TFLOP/s{on}; train.steps "
               f"{hp['train.steps']:,} take {format_seconds(comp['train_time_sec'])}")
  else:
    out.append("  step time        give --device or --peak_tflops for an estimate")
  out.append("")

  out.append("Other hyperparameters: chosen by a person; they steer training but change none "
             "of the numbers above")
  out += _table(("name", "value"), list(report["other_hyperparameters"].items()), right=set())
  for w in report["warnings"]:
    out += ["", f"WARNING: {w}"]
  return "\n".join(out) + "\n"


def _opt(x: float | None, spec: str = ".3g") -> str:
  return "-" if x is None else format(x, spec)


def format_run_text(report: dict[str, Any]) -> str:
  """The human-readable form of `run_report`."""
  out = [f"jaxlm params {report['workdir']} at step {report['step']}: {report['total']:,} "
         f"parameters; drift = ‖θ − θ₀‖ / ‖θ₀‖ from the init of seed {report['seed']} "
         "(- where θ₀ = 0: compare those by Δrms = ‖θ − θ₀‖ / √count)", ""]
  out += _table(
      ("path", "shape", "kind", "rms", "mean", "std", "drift", "Δrms"),
      [(t["path"], " x ".join(map(str, t["shape"])), t["kind"], _opt(t["rms"]),
        _opt(t["mean"]), _opt(t["std"]), _opt(t["drift"]), _opt(t["delta_rms"]))
       for t in report["tensors"]], right={3, 4, 5, 6, 7})
  for title, key in (("By layer", "by_layer"), ("By kind", "by_kind")):
    out += ["", title]
    out += _table(("", "count", "norm", "init norm", "drift", "Δrms"),
                  [(name, f"{g['count']:,}", _opt(g["norm"]), _opt(g["init_norm"]),
                    _opt(g["drift"]), _opt(g["delta_rms"]))
                   for name, g in report[key].items()], right={1, 2, 3, 4, 5})
  g = report["global"]
  out += ["", f"All parameters: drift {_opt(g['drift'])}, Δrms {_opt(g['delta_rms'])}",
          f"Most changed (by Δrms): {', '.join(report['most_changed'])}"]
  for w in report["warnings"]:
    out += ["", f"WARNING: {w}"]
  return "\n".join(out) + "\n"


def plot_drift(report: dict[str, Any], path: str) -> None:
  """PNG of drift per layer: relative drift (left), Δrms per layer and kind (right)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = list(report["by_layer"])
  x = np.arange(len(layers))
  fig, (ax_drift, ax_rms) = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(layers) + 6), 4))
  ax_drift.bar(x, [report["by_layer"][n]["drift"] or 0.0 for n in layers])
  ax_drift.set_ylabel("‖θ − θ₀‖ / ‖θ₀‖")
  ax_drift.set_title(f"drift from init per layer, step {report['step']}")
  kinds = [k for k in KINDS if any(t["kind"] == k for t in report["tensors"])]
  width = 0.8 / max(len(kinds), 1)
  for i, kind in enumerate(kinds):
    sq = {n: [0.0, 0] for n in layers}
    for t in report["tensors"]:
      if t["kind"] == kind:
        sq[t["layer"]][0] += t["delta_rms"] ** 2 * t["count"]
        sq[t["layer"]][1] += t["count"]
    ax_rms.bar(x + (i - (len(kinds) - 1) / 2) * width,
               [math.sqrt(s / c) if c else 0.0 for s, c in sq.values()], width, label=kind)
  ax_rms.set_ylabel("‖θ − θ₀‖ / √count")
  ax_rms.set_title("change per parameter, by kind")
  ax_rms.legend()
  for ax in (ax_drift, ax_rms):
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=60, ha="right")
  fig.tight_layout()
  try:
    fig.savefig(path, dpi=120)
  except OSError as e:
    raise JaxlmError(f"cannot write the plot {path!r}: {e.strerror}") from None
  finally:
    plt.close(fig)
