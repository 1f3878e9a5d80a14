"""From a config to what runs: the model and optimizer, the mesh, the jitted sharded functions.

`train`, `bench` and `params` all set up through here, so they build the same thing:
`make_recipe` needs no devices (params reports on a target that is not this machine), `build`
adds the mesh and the jitted entry points.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from jaxlm import config as config_lib
from jaxlm import evaluate, mup, optim, sharding
from jaxlm import model as model_lib
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ShardedTraining:
  """The jitted, sharded entry points of training for one (model, optimizer, mesh, rules)."""
  abstract_state: step_lib.TrainState  # ShapeDtypeStructs with shardings: the restore target.
  state_shardings: step_lib.TrainState
  # Batches come K at a time, stacked on a leading axis that is never sharded.
  batch_sharding: jax.sharding.NamedSharding
  init: Callable[..., step_lib.TrainState]  # rng -> TrainState, created already sharded.
  # (state, K stacked batches, rng) -> (state, metrics of shape [K]); donates `state`.
  steps: Callable[..., tuple[step_lib.TrainState, dict[str, jax.Array]]]
  eval: Callable[..., dict[str, jax.Array]]  # (params, N stacked batches) -> summed loss, tokens.
  # state -> the params to evaluate, sample from and save as "params" (optim.eval_params);
  # None when they are state.params (no schedule-free optimizer).
  eval_params: Callable[[step_lib.TrainState], PyTree] | None = None

  def params_for_eval(self, state: step_lib.TrainState) -> PyTree:
    return state.params if self.eval_params is None else self.eval_params(state)


def make_sharded_training(model: model_lib.DecoderLM, tx: optax.GradientTransformation,
                          mesh: jax.sharding.Mesh, rules: sharding.Rules, *,
                          grad_accum: int = 1, z_loss: float = 0.0,
                          layer_stats: int = 0, schedule_free: bool = False) -> ShardedTraining:
  """eval_shape -> logical specs -> NamedShardings -> jit with explicit shardings and donation."""
  init_fn = functools.partial(step_lib.init_boxed_state, model=model, tx=tx)
  abstract_boxed = jax.eval_shape(init_fn, jax.random.key(0))
  state_shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  row_sharding = sharding.batch_sharding(mesh, rules)
  stacked_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, *row_sharding.spec))
  replicated = sharding.replicated(mesh)
  step_kwargs = dict(model=model, tx=tx, grad_accum=grad_accum, z_loss=z_loss,
                     layer_stats=layer_stats)
  return ShardedTraining(
      abstract_state=sharding.with_shardings(nn.unbox(abstract_boxed), state_shardings),
      state_shardings=state_shardings,
      batch_sharding=stacked_sharding,
      # Parameters are created already sharded: no device ever holds a full copy first.
      init=jax.jit(lambda rng: nn.unbox(init_fn(rng)), out_shardings=state_shardings),
      steps=jax.jit(functools.partial(step_lib.train_steps, **step_kwargs),
                    in_shardings=(state_shardings, stacked_sharding, replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      eval=jax.jit(functools.partial(evaluate.eval_steps, model=model),
                   in_shardings=(state_shardings.params, stacked_sharding),
                   out_shardings=replicated),
      eval_params=jax.jit(lambda state: optim.eval_params(state.opt_state, state.params),
                          in_shardings=(state_shardings,),
                          out_shardings=state_shardings.params) if schedule_free else None)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What a config trains, before any device is involved: the model and its optimizer."""
  mcfg: model_lib.ModelConfig
  model: model_lib.DecoderLM
  tx: optax.GradientTransformation
  schedule: optax.Schedule  # optim.schedule at lr_mult 1; each group's lr is a multiple of it.
  groups: tuple[optim.Group, ...]  # () = optim.name on every tensor.
  schedule_free: bool  # Some group evaluates on other params than it trains (optim.eval_params).


def make_recipe(cfg: ml_collections.ConfigDict, vocab_size: int) -> Recipe:
  """The model and its optimizer; the parameter groups are checked against the model here."""
  mcfg = config_lib.model_config(cfg, vocab_size)
  model = model_lib.make_model(mcfg)
  # optax schedules need at least one step; a run of train.steps = 0 never takes one anyway.
  total_steps = max(cfg.train.steps, 1)
  # Shapes and logical axes only: the groups' roles and muon's matrix axes come from them.
  boxed = (jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
           if optim.uses_groups(cfg.optim) or mup.enabled(mcfg) else None)
  # μP splits every group by its role and scales each part's lr (jaxlm/mup.py).
  groups = mup.split_groups(mcfg, cfg.optim, boxed, optim.resolve_groups(cfg.optim, boxed))
  return Recipe(mcfg=mcfg, model=model,
                tx=optim.make_optimizer(cfg.optim, total_steps, boxed, groups),
                schedule=optim.make_schedule(cfg.optim, total_steps),
                groups=groups,
                schedule_free=optim.uses_schedule_free(cfg.optim))


@dataclasses.dataclass(frozen=True)
class Setup:
  """A config built for this machine's devices: recipe, mesh, jitted functions and keys."""
  recipe: Recipe
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  training: ShardedTraining
  init_rng: jax.Array
  dropout_rng: jax.Array

  @property
  def mcfg(self) -> model_lib.ModelConfig:
    return self.recipe.mcfg

  @property
  def model(self) -> model_lib.DecoderLM:
    return self.recipe.model


def build(cfg: ml_collections.ConfigDict, vocab_size: int) -> Setup:
  """validate -> model config -> mesh -> rules -> model -> optimizer -> sharded functions."""
  config_lib.validate_config(cfg)
  recipe = make_recipe(cfg, vocab_size)
  mesh = sharding.make_mesh(dict(cfg.mesh.items()))
  rules = sharding.get_rules(cfg.mesh.rules)
  divisor = sharding.batch_divisor(mesh, rules) * cfg.train.grad_accum
  if cfg.train.batch_size % divisor:
    raise JaxlmError(
        f"train.batch_size={cfg.train.batch_size} is not divisible by the {divisor}-way batch "
        f"split (mesh {dict(mesh.shape)}, rules {cfg.mesh.rules!r}, "
        f"grad_accum {cfg.train.grad_accum})")
  init_rng, dropout_rng = step_lib.init_rngs(cfg.seed, cfg.train.dropout_rng)
  training = make_sharded_training(recipe.model, recipe.tx, mesh, rules,
                                   grad_accum=cfg.train.grad_accum, z_loss=cfg.train.z_loss,
                                   layer_stats=cfg.train.log_params_every,
                                   schedule_free=recipe.schedule_free)
  return Setup(recipe=recipe, mesh=mesh, rules=rules, training=training, init_rng=init_rng,
               dropout_rng=dropout_rng)
