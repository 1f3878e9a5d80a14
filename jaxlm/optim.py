"""Optimizer and learning-rate schedule from the `optim` config section."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

PyTree = Any
OPTIMIZERS = ("adamw", "lion", "sgd")


def make_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `total_steps`."""
  warmup = min(opt_cfg.warmup_steps, total_steps)
  if total_steps <= warmup:
    return optax.linear_schedule(0.0, opt_cfg.lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup, decay_steps=total_steps,
      end_value=opt_cfg.min_lr)


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices and embeddings only, never on biases or norm scales (GPT-2)."""
  def decays(path, _):
    return model_lib.path_name(path).rpartition("/")[2] in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """Gradient clipping (by global norm) followed by the named optimizer."""
  schedule = make_schedule(opt_cfg, total_steps)
  if opt_cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                      weight_decay=opt_cfg.weight_decay, mask=decay_mask)
  elif opt_cfg.name == "lion":
    opt = optax.lion(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                     weight_decay=opt_cfg.weight_decay, mask=decay_mask)
  elif opt_cfg.name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask),
                      optax.sgd(schedule, momentum=opt_cfg.b1 or None))
  else:
    raise JaxlmError(f"unknown optim.name={opt_cfg.name!r}: expected one of "
                     f"{', '.join(OPTIMIZERS)}")
  if opt_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), opt)
  return opt
