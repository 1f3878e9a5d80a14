"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay.

Every optimizer group follows the one schedule of the `optim` section times its lr_mult;
schedule-free optimizers take warmup then a constant lr instead (see `group_schedule`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxlm.errors import JaxlmError

# Optimizers whose averaging replaces a decaying schedule; their training iterate is not what
# should be evaluated either (optim.eval_params).
SCHEDULE_FREE = ("schedule_free_adamw",)
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


def _decay(lr: float, min_lr: float, steps: int, shape: str) -> optax.Schedule:
  """lr -> min_lr over `steps` steps along `shape` (then min_lr for ever)."""
  def schedule(count):
    p = jnp.clip(count / max(steps, 1), 0.0, 1.0)
    if shape == "linear":
      f = 1.0 - p
    elif shape == "cosine":
      f = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    else:  # sqrt: 1 - sqrt(p) (MiniCPM, arXiv:2404.06395; Hägele et al., arXiv:2405.18392).
      f = 1.0 - jnp.sqrt(p)
    return min_lr + (lr - min_lr) * f
  return schedule


def _join(pieces: list[tuple[int, optax.Schedule]]) -> optax.Schedule:
  """Schedules one after another; each (length, schedule) counts its steps from 0."""
  pieces = [(n, s) for n, s in pieces[:-1] if n > 0] + pieces[-1:]
  if len(pieces) == 1:
    return pieces[0][1]
  return optax.join_schedules([s for _, s in pieces],
                              list(np.cumsum([n for n, _ in pieces[:-1]])))


def make_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int,
                  kind: str | None = None) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over warmup_steps, then optim.schedule (or `kind`):

  cosine    cosine decay to min_lr at total_steps
  linear    linear decay to min_lr at total_steps
  constant  lr until the end (min_lr unused)
  wsd       warmup-stable-decay: lr until the last decay_fraction of the steps, then decay to
            min_lr at total_steps along decay_shape (linear, cosine, or sqrt = 1 - sqrt)

  A warmup as long as the run or longer shrinks to it: lr is reached at the last step.
  """
  kind = kind or opt_cfg.schedule
  lr, min_lr = opt_cfg.lr, opt_cfg.min_lr
  warmup = min(opt_cfg.warmup_steps, total_steps)
  if total_steps <= warmup:
    return optax.linear_schedule(0.0, lr, max(warmup, 1))
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=min_lr)
  rise = (warmup, optax.linear_schedule(0.0, lr, max(warmup, 1)))
  if kind == "linear":
    return _join([rise, (0, optax.linear_schedule(lr, min_lr, total_steps - warmup))])
  if kind == "constant":
    return _join([rise, (0, optax.constant_schedule(lr))])
  if kind == "wsd":
    decay_steps = min(int(round(opt_cfg.decay_fraction * total_steps)), total_steps - warmup)
    stable = total_steps - warmup - decay_steps
    return _join([rise, (stable, optax.constant_schedule(lr)),
                  (0, _decay(lr, min_lr, decay_steps, opt_cfg.decay_shape))])
  raise JaxlmError(f"unknown optim.schedule={kind!r}: expected one of {', '.join(SCHEDULES)}")


def group_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int, optimizer: str,
                   lr_mult: float = 1.0) -> optax.Schedule:
  """The schedule one group's optimizer follows: the shared one times lr_mult.

  Schedule-free optimizers replace the decay by their averaging (Defazio et al., 2024): they
  always take warmup then a constant lr, whatever optim.schedule says.
  """
  base = make_schedule(opt_cfg, total_steps,
                       kind="constant" if optimizer in SCHEDULE_FREE else None)
  if lr_mult == 1.0:
    return base
  return lambda count: lr_mult * base(count)


def lr_at(opt_cfg: ml_collections.ConfigDict, total_steps: int, optimizer: str,
          lr_mult: float, steps: np.ndarray) -> np.ndarray:
  """The lr each of `steps` (0-based) updates with, as the optimizer itself evaluates it.

  optax.contrib.schedule_free counts its steps from 1, the other optimizers from 0.
  """
  schedule = group_schedule(opt_cfg, total_steps, optimizer, lr_mult)
  offset = 1 if optimizer in SCHEDULE_FREE else 0
  return np.asarray(jax.vmap(schedule)(jnp.asarray(steps) + offset), np.float64)


def lr_curves(opt_cfg: ml_collections.ConfigDict, total_steps: int,
              groups: list[tuple[str, str, float]],
              points: int = 1000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{group: (steps, lr)} at up to `points` steps of a run: each (name, optimizer, lr_mult)."""
  steps = np.unique(np.linspace(0, max(total_steps - 1, 0), points).round().astype(np.int64))
  total = max(total_steps, 1)
  return {f"{name} ({optimizer}, x{lr_mult:g})": (steps, lr_at(opt_cfg, total, optimizer,
                                                               lr_mult, steps))
          for name, optimizer, lr_mult in groups}
