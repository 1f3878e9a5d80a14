"""TrainState and the pure train step: forward -> loss -> gradients -> optax update.

Nothing here is jitted or sharded; `build.py` binds these functions to a mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxlm import losses, metrics
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; arrays only, so it jits, shards and saves as is."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


def init_rngs(seed: int, dropout_rng: str = "threefry2x32") -> tuple[jax.Array, jax.Array]:
  """(init_rng, dropout_rng): the parameter init key and the base key of dropout.

  `dropout_rng` is train.dropout_rng (config.DROPOUT_RNGS says what each generator is).
  """
  init_rng, dropout_key = jax.random.split(jax.random.key(seed))
  if dropout_rng in ("rbg", "unsafe_rbg"):
    dropout_key = jax.random.key(seed, impl=dropout_rng)
  return init_rng, dropout_key


def init_boxed_state(rng: jax.Array, *, model: model_lib.DecoderLM,
                     tx: optax.GradientTransformation) -> TrainState:
  """The initial state with flax `Partitioned` boxes still on (they carry the logical axes)."""
  params = model_lib.init_params(model, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array, *,
            model: model_lib.DecoderLM, z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], train=True,
                             rngs={"dropout": rng})
  return losses.cross_entropy(logits_BxLxV, batch["targets"], batch.get("loss_mask"),
                              z_loss=z_loss)


def train_step(state: TrainState, batch: dict[str, jax.Array], base_rng: jax.Array, *,
               model: model_lib.DecoderLM, tx: optax.GradientTransformation, grad_accum: int = 1,
               z_loss: float = 0.0,
               layer_stats: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """forward -> loss -> grads (averaged over `grad_accum` microbatches) -> optax update.

  With `layer_stats` = k > 0, the metrics also hold metrics.layer_stats of the new params,
  the (unclipped) grads and the updates, computed on every k-th step (zeros on the others,
  which the loop never reads).
  """
  # Dropout randomness is a function of the step: nothing random is carried in the state.
  rng = jax.random.fold_in(base_rng, state.step)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, z_loss=z_loss),
                               has_aux=True)
  if grad_accum == 1:
    (_, aux), grads = grad_fn(state.params, batch, rng)
    loss = aux["loss"]
  else:
    # Microbatch i takes rows i, i + k, i + 2k, ...: every device keeps working on its own rows.
    def split(x):
      x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    def accumulate(carry, xs):
      i, microbatch = xs
      (_, aux), g = grad_fn(state.params, microbatch, jax.random.fold_in(rng, i))
      grads_sum, loss_sum = carry
      return (jax.tree.map(jnp.add, grads_sum, g), loss_sum + aux["loss"]), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
    microbatches = (jnp.arange(grad_accum), jax.tree.map(split, batch))
    (grads_sum, loss_sum), _ = jax.lax.scan(accumulate, zeros, microbatches)
    grads = jax.tree.map(lambda g: g / grad_accum, grads_sum)
    loss = loss_sum / grad_accum
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                  "param_norm": optax.tree.norm(params)}
  if layer_stats:
    # Under scan_layers the blocks are one stacked subtree; report them per layer anyway.
    stacked = model_lib.BLOCKS if model.cfg.scan_layers else None
    compute = functools.partial(metrics.layer_stats_of, stacked=stacked)
    operands = (params, grads, updates)
    shapes = jax.eval_shape(compute, operands)
    skip = lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # Only steps whose stats get logged pay for them (three passes over every tensor).
    step_metrics.update(jax.lax.cond(new_state.step % layer_stats == 0, compute, skip, operands))
  return new_state, step_metrics


def train_steps(state: TrainState, batches: dict[str, jax.Array], base_rng: jax.Array,
                **kwargs: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` over a leading axis of K batches in one call (lax.scan); metrics get [K].

  The math is the same as K separate calls; it only saves the per-call dispatch overhead,
  which dominates small models on a CPU.
  """
  def body(state, batch):
    return train_step(state, batch, base_rng, **kwargs)
  return jax.lax.scan(body, state, batches)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """True iff no float leaf of `tree` holds a NaN or an infinity: one scalar for the host."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def diverged(step: int, what: str, last_saved: int | None) -> JaxlmError:
  """The one-line error that stops a run at its first non-finite step, saying what was kept."""
  kept = (f"the last checkpoint, step {last_saved}, is kept (nothing after it was saved)"
          if last_saved is not None else "no checkpoint was saved")
  return JaxlmError(f"training diverged at step {step}: {what}; {kept}; try a lower optim.lr "
                    "or a smaller optim.grad_clip")
