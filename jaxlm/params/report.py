"""The report for a config: anatomy, memory and compute, with no parameter allocated."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxlm import axes, devices, metrics, mup, optim, sharding
from jaxlm import build as build_lib
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError
from jaxlm.params import anatomy, cost

# Hyperparameters that fix the numbers of the report, and some that do not (they change what
# training does with the parameters, not how many there are or what a step costs).
SIZE_HYPERPARAMETERS = (
    "model.family", "model.norm", "model.position", "model.mlp",
    "model.qk_norm", "model.attention_window",  # Norm scales; attention FLOPs.
    "model.n_layer", "model.n_head", "model.n_kv_head", "model.d_model", "model.d_ff",
    "model.block_size", "model.vocab_size", "model.bias", "model.tie_embeddings", "model.dtype",
    "model.param_dtype", "model.remat", "model.scan_layers", "optim.name", "train.batch_size",
    "train.grad_accum", "train.steps",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.rules")
OTHER_HYPERPARAMETERS = (
    "seed", "model.dropout", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.schedule",
    "optim.decay_fraction", "optim.decay_shape", "optim.b1",
    "optim.b2", "optim.weight_decay", "optim.grad_clip", "sample.temperature", "sample.top_k",
    "sample.top_p")


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
    if cfg.model.dtype == "auto":  # As the target device would resolve it, not this machine.
      cfg = cfg.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.model.dtype = "bfloat16"  # Every device in the table is an accelerator.
    peak_tflops = peak_tflops or known.peak(cfg.model.dtype) / 1e12
    device_memory_gib = device_memory_gib or known.memory_gib
  vocab_size, vocab_source = config_lib.resolve_vocab_size(cfg)
  recipe = build_lib.make_recipe(cfg, vocab_size)
  mcfg = recipe.mcfg
  warnings: list[str] = []

  # --- Anatomy ---------------------------------------------------------------------------------
  abstract_state = jax.eval_shape(
      functools.partial(step_lib.init_boxed_state, model=recipe.model, tx=recipe.tx),
      jax.random.key(0))
  rows = anatomy.tensors(abstract_state.params)
  # Which optimizer group trains each tensor; "all" when optim.name trains every one.
  group_of = {p.path: g.name for g in recipe.groups for p in g.params}
  if recipe.groups:
    groups = [{"name": g.name, "optimizer": g.optimizer, "lr_mult": g.lr_mult,
               "weight_decay": g.decay_text(cfg.optim.weight_decay), "tensors": len(g.params),
               "params": g.n_params} for g in recipe.groups]
  else:
    groups = [{"name": "all", "optimizer": cfg.optim.name, "lr_mult": 1.0,
               "weight_decay": f"{cfg.optim.weight_decay:g} (kernels, embeddings)",
               "tensors": len(rows), "params": sum(t.count for t in rows)}]
  # Under μP each tensor's role and multipliers (init std, lr; relative to sp), by the
  # optimizer of its group (the rule differs for sgd).
  optimizer_of = {p.path: g.optimizer for g in recipe.groups for p in g.params}
  mup_of = {t.path: mup.rule(mcfg, optimizer_of.get(t.path, cfg.optim.name),
                             optim.Param(t.path, t.shape, t.logical_axes))
            for t in rows} if mup.enabled(mcfg) else {}
  total = sum(t.count for t in rows)
  formula = anatomy.formula_param_counts(mcfg)
  counted = anatomy.count_by(rows, "kind")
  by_kind = {k: counted.get(k, 0) for k in anatomy.KINDS} | {
      k: v for k, v in counted.items() if k not in anatomy.KINDS}
  if formula["total"] != total:
    warnings.append(f"the analytic formula gives {formula['total']:,} parameters but the model "
                    f"has {total:,}: the formula is out of date with jaxlm/model.py")
  n_matmul = model_lib.matmul_params(nn.unbox(abstract_state.params))

  # --- Memory ----------------------------------------------------------------------------------
  rules = sharding.get_rules(cfg.mesh.rules)
  shape = sharding.mesh_shape(dict(cfg.mesh.items()), n_devices)
  mesh_sizes = dict(zip(axes.MESH_AXES, shape, strict=True))
  param_total, param_dev = cost.state_bytes(abstract_state.params, rules, mesh_sizes)
  opt_total, opt_dev = cost.state_bytes(abstract_state.opt_state, rules, mesh_sizes)
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
  act_per_token = cost.activation_bytes_per_token(mcfg, tensor_ways=tensor_ways)
  act_dev = int(act_per_token * batch_per_device * mcfg.block_size)
  act_total = int(cost.activation_bytes_per_token(mcfg) * micro_batch * mcfg.block_size)
  per_device = param_dev + opt_dev + grad_copies * param_dev + act_dev
  fits = None
  if device_memory_gib:
    available = device_memory_gib * cost.GIB
    fits = per_device <= available
    if not fits:
      warnings.append(
          f"does not fit: needs {per_device / cost.GIB:.2f} GiB per device (params "
          f"{param_dev / cost.GIB:.2f} + optimizer {opt_dev / cost.GIB:.2f} + gradients "
          f"{grad_copies * param_dev / cost.GIB:.2f} + activations "
          f"{act_dev / cost.GIB:.2f}) but a device has {device_memory_gib:g} GiB: "
          f"{(per_device - available) / cost.GIB:.2f} GiB short. "
          "Shard params and optimizer state over more devices (mesh.fsdp with rules fsdp), use "
          "a smaller train.batch_size per device or more train.grad_accum, or a larger device")
    elif per_device > 0.9 * available:
      warnings.append(f"tight: needs {per_device / cost.GIB:.2f} of {device_memory_gib:g} GiB "
                      "per device; XLA's temporaries may not fit in what is left")

  # --- Compute ---------------------------------------------------------------------------------
  flops_token = metrics.flops_per_token(n_matmul, mcfg.n_layer, mcfg.d_model, mcfg.block_size,
                                        mcfg.layer_windows)
  attended = metrics.attended_keys(mcfg.n_layer, mcfg.block_size, mcfg.layer_windows)
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
                   "kind": t.kind, "layer": t.layer, "group": group_of.get(t.path, "all"),
                   "logical_axes": None if t.logical_axes is None else list(t.logical_axes)}
                  | ({"mup": {"role": mup_of[t.path].role, "init_mult": mup_of[t.path].init_mult,
                              "lr_mult": mup_of[t.path].lr_mult}} if mup_of else {})
                  for t in rows],
      "mup": mup.describe(mcfg) if mup_of else None,
      "optimizer_groups": groups,
      "params": {
          "total": total, "by_kind": by_kind,
          "by_layer": anatomy.count_by_layer(rows),
          "matmul": n_matmul,
          "formula": anatomy.PARAM_FORMULA, "formula_total": formula["total"],
          "formula_by_kind": {k: formula[k] for k in anatomy.KINDS},
          "formula_per_block": anatomy.formula_block_params(mcfg),
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
          "flops_per_token": flops_token, "convention": anatomy.FLOPS_CONVENTION,
          "attended_keys": attended,
          "tokens_per_step": tokens_per_step, "flops_per_step": flops_step,
          "device": device or None, "peak_tflops_per_device": peak_tflops or None,
          "mfu": mfu, "step_time_sec": step_time,
          "train_time_sec": None if step_time is None else step_time * cfg.train.steps,
      },
      "warnings": warnings,
  }
