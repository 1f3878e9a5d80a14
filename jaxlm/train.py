"""TrainState, the pure train step and the training loop: reads the whole config."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxlm import allocator, evaluate, losses, metrics, optim, sample, sharding, tokenizers
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import data as data_lib
from jaxlm import model as model_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

PyTree = Any
# What model.family fills in for each architecture key left at its "" / None / 0 default.
FAMILY_PRESETS = {
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", bias=True,
                 tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False,
                  tie_embeddings=False, rope_theta=10000.0, norm_eps=1e-5),
}
FAMILIES = tuple(FAMILY_PRESETS)
PRESET_KEYS = tuple(FAMILY_PRESETS["gpt2"])


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; arrays only, so it jits, shards and saves as is."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


# ---------------------------------------------------------------------------------------------
# Config -> validated pieces. Everything here runs before any compilation.
# ---------------------------------------------------------------------------------------------

def llama_ff_dim(d_model: int, multiple_of: int = 256) -> int:
  """LLaMA's MLP width: 2/3 of 4 * d_model (SwiGLU has three matrices, not two), rounded up."""
  hidden = int(2 * 4 * d_model / 3)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def resolved_architecture(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """model.norm/position/mlp/bias/... with the family preset filled in where left unset.

  Configs saved before these keys existed lack them; they read as unset, i.e. the preset.
  """
  if m.family not in FAMILIES:
    raise JaxlmError(f"unknown model.family={m.family!r}: expected one of {', '.join(FAMILIES)}")
  preset = FAMILY_PRESETS[m.family]
  out = {}
  for key in PRESET_KEYS:
    value = m[key] if key in m else None
    out[key] = preset[key] if value in (None, "", 0) and value is not False else value
  return out


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  m = cfg.model
  arch = resolved_architecture(m)
  if m.vocab_size and m.vocab_size < vocab_size:
    raise JaxlmError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({vocab_size}); set it to 0 to derive it")
  d_ff = m.d_ff or (llama_ff_dim(m.d_model) if m.family == "llama" else 0)
  return model_lib.ModelConfig(
      vocab_size=m.vocab_size or vocab_size, block_size=m.block_size, n_layer=m.n_layer,
      n_head=m.n_head, n_kv_head=m.n_kv_head, d_model=m.d_model, d_ff=d_ff,
      dropout=m.dropout, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
      scan_layers=m.scan_layers, attention_block=m.attention_block,
      hash_dropout=cfg.train.dropout_rng == "hash", **arch)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises JaxlmError naming the first impossible value; cheap, no data or devices touched."""
  model_config(cfg, vocab_size=1)  # Shape checks (divisibility, ranges) with a stand-in vocab.
  t = cfg.train
  for key in ("batch_size", "grad_accum", "log_every", "eval_steps", "steps_per_call"):
    if t[key] < 1:
      raise JaxlmError(f"train.{key} must be >= 1, got {t[key]}")
  if t.dropout_rng not in DROPOUT_RNGS:
    raise JaxlmError(f"unknown train.dropout_rng={t.dropout_rng!r}: expected one of "
                     f"{', '.join(DROPOUT_RNGS)}")
  for key in ("steps", "eval_every"):
    if t[key] < 0:
      raise JaxlmError(f"train.{key} must be >= 0, got {t[key]}")
  if t.log_params_every < 0 or (t.log_params_every and t.log_params_every % t.log_every):
    raise JaxlmError(f"train.log_params_every={t.log_params_every} must be 0 (off) or a "
                     f"multiple of train.log_every={t.log_every}: the stats leave the device "
                     "only on log steps")
  if t.batch_size % t.grad_accum:
    raise JaxlmError(f"train.batch_size={t.batch_size} is not divisible by "
                     f"train.grad_accum={t.grad_accum}")
  tok = cfg.data.tokenizer
  if tok not in tokenizers.KINDS and not tokenizers.is_tokenizer_path(tok):
    raise JaxlmError(f"unknown data.tokenizer={tok!r}: expected one of "
                     f"{', '.join(tokenizers.KINDS)} or the path of a tokenizer.json")
  if tokenizers.is_tokenizer_path(tok) and not workdir_lib.path(tok).is_file():
    raise JaxlmError(f"tokenizer file not found: data.tokenizer={tok!r}")
  if tok == "bpe" and cfg.data.vocab_size < tokenizers.MIN_BPE_VOCAB:
    raise JaxlmError(f"data.vocab_size={cfg.data.vocab_size} is too small for byte-level BPE: "
                     f"it needs at least {tokenizers.MIN_BPE_VOCAB} (256 bytes + merges)")
  if cfg.optim.name not in optim.OPTIMIZERS:
    raise JaxlmError(f"unknown optim.name={cfg.optim.name!r}: expected one of "
                     f"{', '.join(optim.OPTIMIZERS)}")
  if cfg.optim.lr < 0 or cfg.optim.min_lr < 0 or cfg.optim.warmup_steps < 0:
    raise JaxlmError("optim.lr, optim.min_lr and optim.warmup_steps must be >= 0")
  sharding.get_rules(cfg.mesh.rules)


def count_params(params: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def matmul_params(params: PyTree) -> int:
  """Parameters that take part in matmuls: all but the position embedding table."""
  return count_params(params) - count_params(params.get("wpe", {}))


def check_resumable(workdir: str, resolved: dict[str, Any]) -> None:
  """Refuses to continue a run whose saved model hyperparameters differ from `resolved`."""
  root = workdir_lib.path(workdir)
  if not (root / "config.json").exists() or not (root / "checkpoints").is_dir():
    return
  saved = json.loads(workdir_lib.read_text(root / "config.json"))
  for key, value in resolved["model"].items():
    if key in saved.get("model", {}) and saved["model"][key] != value:
      raise JaxlmError(
          f"workdir {workdir} holds a run with model.{key}={saved['model'][key]!r} but the "
          f"config says {value!r}; use a new workdir (with --config.train.init_from={workdir} "
          "to start from its weights)")


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """Abstract arrays (ShapeDtypeStruct) that carry the given shardings: an orbax restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# Generators for dropout masks (train.dropout_rng). threefry2x32 is JAX's default: the same
# bits on every backend and sharding. rbg draws bits with XLA's RngBitGenerator (keys are still
# split and folded with threefry): the masks of shakespeare_char_large took 0.33 instead of
# 0.54 s per 25M on 2 CPU cores; its bits may differ across backends and XLA versions, so a run
# is reproducible on one platform only. unsafe_rbg also derives keys with RngBitGenerator. hash
# keeps threefry keys but turns each into a mask with a counter hash that XLA fuses into the
# masked op (model.HashDropout): no mask is written to memory, and the bits are the same on
# every mesh. shakespeare_char_large steps in 6.8 s (threefry), 6.2 s (rbg), 5.5-5.6 s (hash)
# with tcmalloc; with glibc malloc 7.7, 7.5 and 6.6 s (experiments/cpu_throughput/).
DROPOUT_RNGS = ("threefry2x32", "rbg", "unsafe_rbg", "hash")


def init_rngs(seed: int, dropout_rng: str = "threefry2x32") -> tuple[jax.Array, jax.Array]:
  """(init_rng, dropout_rng): the parameter init key and the base key of dropout."""
  init_rng, dropout_key = jax.random.split(jax.random.key(seed))
  if dropout_rng in ("rbg", "unsafe_rbg"):
    dropout_key = jax.random.key(seed, impl=dropout_rng)
  return init_rng, dropout_key


SAMPLE_RNG_STREAM = 3  # samples.txt at step s uses fold_in(fold_in(key(seed), 3), s).


class StopRequest:
  """Turns the first SIGTERM/SIGINT into "stop after this step"; a second SIGINT aborts."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # Signal handlers can only be installed from the main thread.
    # Multi-host runs leave SIGTERM to JAX's preemption notifier (see `should_stop`).
    signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: abort at once.
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: stopping after the current step with a checkpoint",
                    self.signal_name)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host reaches the same answer at the same step (JAX's preemption sync point).
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = self.signal_name or "preemption"
          return True
      except RuntimeError:
        pass  # Preemption service disabled: fall back to local signals.
    return self.signal_name is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Pure functions: init, loss, train step.
# ---------------------------------------------------------------------------------------------

def init_boxed_state(rng: jax.Array, *, model: model_lib.GPT,
                     tx: optax.GradientTransformation) -> TrainState:
  """The initial state with flax `Partitioned` boxes still on (they carry the logical axes)."""
  params = model_lib.init_params(model, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array, *,
            model: model_lib.GPT, z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], train=True,
                             rngs={"dropout": rng})
  return losses.cross_entropy(logits_BxLxV, batch["targets"], batch.get("loss_mask"),
                              z_loss=z_loss)


def train_step(state: TrainState, batch: dict[str, jax.Array], base_rng: jax.Array, *,
               model: model_lib.GPT, tx: optax.GradientTransformation, grad_accum: int = 1,
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
    # Under scan_layers the blocks are one stacked subtree, "h"; report them per layer anyway.
    stacked = "h" if model.cfg.scan_layers else None
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


@dataclasses.dataclass(frozen=True)
class ShardedTraining:
  """The jitted, sharded entry points of training for one (model, optimizer, mesh, rules)."""
  abstract_state: TrainState  # ShapeDtypeStructs carrying shardings: the restore target.
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  init: Any  # rng -> TrainState, created already sharded.
  step: Any  # (state, batch, rng) -> (state, metrics); donates `state`.
  steps: Any  # (state, K stacked batches, rng) -> (state, metrics of shape [K]); donates `state`.
  stacked_batch_sharding: jax.sharding.NamedSharding
  eval: Any  # (params, N stacked batches) -> {"loss_sum", "tokens"} summed over them.


def make_sharded_training(model: model_lib.GPT, tx: optax.GradientTransformation,
                          mesh: jax.sharding.Mesh, rules: sharding.Rules, *,
                          grad_accum: int = 1, z_loss: float = 0.0,
                          layer_stats: int = 0) -> ShardedTraining:
  """eval_shape -> logical specs -> NamedShardings -> jit with explicit shardings and donation."""
  init_fn = functools.partial(init_boxed_state, model=model, tx=tx)
  abstract_boxed = jax.eval_shape(init_fn, jax.random.key(0))
  state_shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  stacked_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))
  replicated = sharding.replicated(mesh)
  step_kwargs = dict(model=model, tx=tx, grad_accum=grad_accum, z_loss=z_loss,
                     layer_stats=layer_stats)
  return ShardedTraining(
      abstract_state=with_shardings(nn.unbox(abstract_boxed), state_shardings),
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      # Parameters are created already sharded: no device ever holds a full copy first.
      init=jax.jit(lambda rng: nn.unbox(init_fn(rng)), out_shardings=state_shardings),
      step=jax.jit(functools.partial(train_step, **step_kwargs),
                   in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      steps=jax.jit(functools.partial(train_steps, **step_kwargs),
                    in_shardings=(state_shardings, stacked_sharding, replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      stacked_batch_sharding=stacked_sharding,
      eval=jax.jit(functools.partial(evaluate.eval_steps, model=model),
                   in_shardings=(state_shardings.params, stacked_sharding),
                   out_shardings=replicated))


# ---------------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------------

def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
  t_start = time.perf_counter()
  validate_config(cfg)
  root = workdir_lib.prepare(workdir)  # A local path or gs:// URL (see workdir.py).
  is_main = jax.process_index() == 0

  # --- Data -----------------------------------------------------------------------------------
  dataset = data_lib.load_dataset(
      cfg.data.path, cfg.data.tokenizer, val_fraction=cfg.data.val_fraction,
      block_size=cfg.model.block_size, cache_dir=cfg.data.cache_dir,
      vocab_size=cfg.data.vocab_size)
  mcfg = model_config(cfg, dataset.tokenizer.vocab_size)
  resolved = cfg.to_dict()
  resolved["model"]["vocab_size"] = mcfg.vocab_size
  resolved["model"].update(resolved_architecture(cfg.model))  # config.json says what ran.

  # --- Mesh and batch geometry ------------------------------------------------------------------
  mesh = sharding.make_mesh(dict(cfg.mesh.items()))
  rules = sharding.get_rules(cfg.mesh.rules)
  divisor = sharding.batch_divisor(mesh, rules) * cfg.train.grad_accum
  if cfg.train.batch_size % divisor:
    raise JaxlmError(
        f"train.batch_size={cfg.train.batch_size} is not divisible by the {divisor}-way batch "
        f"split (mesh {dict(mesh.shape)}, rules {cfg.mesh.rules!r}, "
        f"grad_accum {cfg.train.grad_accum})")
  batch_sharding = sharding.batch_sharding(mesh, rules)
  n_proc, proc = jax.process_count(), jax.process_index()
  logging.info("process %d of %d: %d of %d devices; mesh %s; this process holds %s", proc,
               n_proc, jax.local_device_count(), jax.device_count(), dict(mesh.shape),
               sharding.local_position(mesh))

  def host_batch_at(tokens, step, stream):
    return data_lib.get_batch(
        tokens, seed=cfg.seed, step=step, batch_size=cfg.train.batch_size,
        block_size=mcfg.block_size, stream=stream, process_index=proc, process_count=n_proc)

  def batch_at(tokens, step, stream):
    return sharding.host_to_global(host_batch_at(tokens, step, stream), batch_sharding)

  def chunk_at(step, k):
    """The training batches of steps step .. step + k - 1, stacked on a leading axis."""
    batches = [host_batch_at(dataset.train, s, data_lib.TRAIN_STREAM)
               for s in range(step, step + k)]
    stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
    return sharding.host_to_global(stacked, fns.stacked_batch_sharding)

  # --- Model, optimizer and the abstract (sharded) state ----------------------------------------
  model = model_lib.make_model(mcfg)
  # Sampling settings and prompt for samples.txt: bad ones fail here, before anything compiles.
  sampler = sample.make_sampler(model, sample.SampleSettings.from_config(
      cfg.sample, dataset.tokenizer.vocab_size))
  sample.encode_prompts(dataset.tokenizer, [cfg.sample.prompt])
  total_steps = cfg.train.steps
  tx = optim.make_optimizer(cfg.optim, total_steps)
  schedule = optim.make_schedule(cfg.optim, total_steps)
  init_rng, dropout_rng = init_rngs(cfg.seed, cfg.train.dropout_rng)
  fns = make_sharded_training(model, tx, mesh, rules, grad_accum=cfg.train.grad_accum,
                              z_loss=cfg.train.z_loss,
                              layer_stats=cfg.train.log_params_every)
  restore_target, state_shardings = fns.abstract_state, fns.state_shardings

  # --- Checkpoints: resume, or start fresh (optionally from another run's weights) --------------
  check_resumable(workdir, resolved)  # Before anything in the workdir is written.
  ckpt = checkpoint_lib.Checkpointer(root / "checkpoints", keep=cfg.checkpoint.keep)
  latest = ckpt.latest_step()
  if latest is not None and ckpt.meta(latest).get("params_only"):
    raise JaxlmError(f"workdir {workdir} holds imported params without optimizer state (step "
                     f"{latest}); train from them in a new workdir with "
                     f"--config.train.init_from={workdir}")
  if is_main:
    tokenizers.save(dataset.tokenizer, root / "tokenizer.json")
    workdir_lib.write_text(root / "config.json", json.dumps(resolved, indent=2, sort_keys=True))
  ckpt_meta = {"config": resolved, "tokenizer": dataset.tokenizer.to_json()}
  if latest is not None:
    t0 = time.perf_counter()
    restored = ckpt.restore(latest, {"params": restore_target.params,
                                     "opt_state": restore_target.opt_state})
    state = TrainState(step=jax.device_put(jnp.asarray(latest, jnp.int32),
                                           state_shardings.step),
                       params=restored["params"], opt_state=restored["opt_state"])
    logging.info("resumed from checkpoint at step %d (%.2fs)", latest,
                 time.perf_counter() - t0)
  else:
    state = fns.init(init_rng)
    if cfg.train.init_from:
      params = load_params(cfg.train.init_from, restore_target.params)
      state = state.replace(params=params)
      logging.info("initialised params from %s", cfg.train.init_from)

  step_fn, eval_fn = fns.step, fns.eval

  n_params = count_params(state.params)
  tokens_per_step = cfg.train.batch_size * mcfg.block_size
  flops_per_token = metrics.flops_per_token(matmul_params(state.params), mcfg.n_layer,
                                            mcfg.d_model, mcfg.block_size)
  peak_flops = metrics.peak_flops_total(mcfg.dtype)
  logging.info("config:\n%s", cfg)
  logging.info("data: %s | tokenizer %s, vocab %d | train %s tokens, val %s tokens",
               dataset.source, dataset.tokenizer.kind, dataset.tokenizer.vocab_size,
               f"{len(dataset.train):,}", f"{len(dataset.val):,}")
  logging.info("model: %s parameters (%s in matmuls) | %.3g FLOPs/token | %d layers, "
               "d_model %d, %d heads, block %d", f"{n_params:,}",
               f"{matmul_params(state.params):,}", flops_per_token, mcfg.n_layer,
               mcfg.d_model, mcfg.n_head, mcfg.block_size)
  logging.info("devices: %d x %s on %d process(es) | mesh %s | rules %s | batch %d global, "
               "%d per process, %d tokens/step | peak %.1f TFLOP/s | malloc %s",
               jax.device_count(), jax.devices()[0].device_kind, n_proc, dict(mesh.shape),
               cfg.mesh.rules, cfg.train.batch_size, cfg.train.batch_size // n_proc,
               tokens_per_step, peak_flops / 1e12, allocator.loaded())

  # --- Compile ahead of time, so errors and compile time show before the loop -----------------
  step = int(state.step)
  per_call = cfg.train.steps_per_call
  t0 = time.perf_counter()
  steps_fn = fns.steps
  if per_call > 1:
    # The single-step function is then only needed between boundaries that K does not
    # divide; it compiles on first use, if ever.
    steps_fn = steps_fn.lower(state, chunk_at(step, per_call), dropout_rng).compile()
  else:
    step_fn = step_fn.lower(state, batch_at(dataset.train, step, data_lib.TRAIN_STREAM),
                            dropout_rng).compile()
  logging.info("compiled train step%s in %.2fs",
               f" ({per_call} steps per call)" if per_call > 1 else "",
               time.perf_counter() - t0)

  eval_batches = {  # Each split's batches stacked: one call evaluates them all.
      name: sharding.host_to_global(
          evaluate.stack(host_batch_at(tokens, i, stream) for i in range(cfg.train.eval_steps)),
          fns.stacked_batch_sharding)
      for name, tokens, stream in (("train", dataset.train, data_lib.EVAL_TRAIN_STREAM),
                                   ("val", dataset.val, data_lib.EVAL_VAL_STREAM))}
  writer = metrics.MetricsWriter(workdir, enabled=is_main)

  def run_eval(step: int) -> dict[str, float]:
    results = {}
    for split, batches in eval_batches.items():
      for k, v in evaluate.evaluate(eval_fn, state.params, batches).items():
        results[f"{split}/{k}"] = v
    writer.write(step, {k.replace("train/", "eval_train/"): v for k, v in results.items()})
    logging.info("eval  step %d | train loss %.4f | val loss %.4f | val ppl %.2f | "
                 "val bits/token %.4f", step, results["train/loss"], results["val/loss"],
                 results["val/perplexity"], results["val/bits_per_token"])
    write_sample(step)
    return results

  sample_rng = jax.random.fold_in(jax.random.key(cfg.seed), SAMPLE_RNG_STREAM)
  last_sampled = -1

  def write_sample(step: int) -> None:
    """Appends a sample from the current params to samples.txt (once per step)."""
    nonlocal last_sampled
    if step == last_sampled:
      return
    last_sampled = step
    # Every process samples (the params may be sharded across them); process 0 writes.
    result = sample.sample_text(sampler, state.params, dataset.tokenizer, [cfg.sample.prompt],
                                jax.random.fold_in(sample_rng, step))
    if is_main:
      sample.append_samples(root / "samples.txt", step, cfg.sample.prompt, result.texts)
    logging.info("sample  step %d | %d tokens at %.0f tokens/s -> samples.txt", step,
                 result.num_tokens, result.tokens_per_sec)

  def save(step: int, val_loss: float | None) -> None:
    t0 = time.perf_counter()
    ckpt.save(step, {"params": state.params, "opt_state": state.opt_state}, ckpt_meta,
              val_loss=val_loss)
    logging.info("saving checkpoint at step %d (async; %.2fs blocking)", step,
                 time.perf_counter() - t0)

  # --- Loop -------------------------------------------------------------------------------------
  def next_boundary(step: int) -> int:
    """The next step at which the loop must stop to log, evaluate, save or finish."""
    t = cfg.train
    periods = [p for p in (t.log_every, t.eval_every, cfg.checkpoint.every, t.log_params_every)
               if p > 0]
    candidates = [(step // p + 1) * p for p in periods] + [total_steps]
    if t.stop_at > step:
      candidates.append(t.stop_at)
    return min(candidates)

  final = run_eval(step) if cfg.train.eval_every and step == 0 else {}
  stop = StopRequest()
  pending: list[dict[str, jax.Array]] = []
  t_log, step_log = time.perf_counter(), step
  last_saved = latest
  stopped_early = False
  try:
    while step < total_steps:
      # Dispatch is asynchronous: the host builds the next batches while the device computes.
      if per_call > 1 and next_boundary(step) - step >= per_call:
        state, step_metrics = steps_fn(state, chunk_at(step, per_call), dropout_rng)
        step += per_call
      else:
        state, step_metrics = step_fn(
            state, batch_at(dataset.train, step, data_lib.TRAIN_STREAM), dropout_rng)
        step_metrics = jax.tree.map(lambda x: x[None], step_metrics)  # Same [K] layout.
        step += 1
      # Per-layer stats stay on the device; only a log_params_every step fetches them.
      layer_stats = {k: step_metrics.pop(k) for k in list(step_metrics)
                     if k.startswith(metrics.LAYER_STAT_PREFIXES)}
      pending.append(step_metrics)
      done = step == total_steps
      stopping = stop.should_stop(step) or step == cfg.train.stop_at
      if step % cfg.train.log_every == 0 or done or stopping:
        fetched = jax.device_get(pending)  # The only host sync on a training step.
        pending = []
        now = time.perf_counter()
        sec_per_step = (now - t_log) / (step - step_log)
        t_log, step_log = now, step
        loss = float(np.mean(np.concatenate([m["loss"] for m in fetched])))
        if not math.isfinite(loss):
          raise JaxlmError(f"training diverged: loss is {loss} at step {step}; try a lower "
                           "optim.lr or a smaller optim.grad_clip")
        tokens_per_sec = tokens_per_step / sec_per_step
        mfu = flops_per_token * tokens_per_sec / peak_flops
        lr = float(schedule(step - 1))
        log_params = cfg.train.log_params_every and step % cfg.train.log_params_every == 0
        layer_record = ({k: v[-1] for k, v in jax.device_get(layer_stats).items()}
                        if log_params else {})
        writer.write(step, {"train/loss": loss, "lr": lr,
                            "grad_norm": float(fetched[-1]["grad_norm"][-1]),
                            "param_norm": float(fetched[-1]["param_norm"][-1]),
                            "tokens_per_sec": tokens_per_sec,
                            "ms_per_step": 1e3 * sec_per_step, "mfu": mfu, **layer_record})
        logging.info("step %d/%d | loss %.4f | lr %.2e | %s tok/s | %.1f ms/step | MFU %.1f%% "
                     "| ETA %s", step, total_steps, loss, lr, f"{tokens_per_sec:,.0f}",
                     1e3 * sec_per_step, 100 * mfu,
                     metrics.format_duration((total_steps - step) * sec_per_step))
      evaluated = cfg.train.eval_every and (step % cfg.train.eval_every == 0 or done)
      if evaluated:
        final = run_eval(step)
      every = cfg.checkpoint.every
      saving = done or stopping or (every and step % every == 0)
      if saving:
        save(step, final["val/loss"] if evaluated else None)
        last_saved = step
      if evaluated or saving:
        t_log = time.perf_counter()  # Keep evaluation and saving out of throughput numbers.
      if stopping:
        stopped_early = not done
        break
    if last_saved != step:
      save(step, None)  # E.g. train.steps = 0: the initial state is still a checkpoint.
  finally:
    stop.restore()
    t0 = time.perf_counter()
    ckpt.wait()  # Every started save completes (or the process dies and it never counts).
    ckpt.close()
    writer.close()
  logging.info("checkpoints finished writing in %.2fs", time.perf_counter() - t0)
  if not stopped_early:
    write_sample(step)

  wall = time.perf_counter() - t_start
  if stopped_early:
    why = stop.signal_name or f"train.stop_at={cfg.train.stop_at}"
    logging.info("stopped at step %d/%d (%s) with a checkpoint; run the same command to resume",
                 step, total_steps, why)
  if is_main:
    with metrics.MetricsWriter(workdir, tensorboard=False) as w:
      w.write(step, {"wall_time_sec": wall})
  logging.info("done: %d steps in %s (%.1fs wall, compile and evals included)%s", step,
               metrics.format_duration(wall), wall,
               f" | final val loss {final['val/loss']:.4f}" if final else "")
  return {**final, "wall_time_sec": wall, "step": step, "stopped_early": stopped_early}


# ---------------------------------------------------------------------------------------------
# Loading a trained run (for sampling, evaluation, parameter reports and fine-tuning).
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run restored from its workdir."""
  cfg: ml_collections.ConfigDict
  tokenizer: tokenizers.Tokenizer
  model: model_lib.GPT
  params: PyTree
  step: int


def _read_run_config(workdir: str) -> ml_collections.ConfigDict:
  root = workdir_lib.path(workdir)
  if not root.is_dir():
    raise JaxlmError(f"no run in {workdir!r}: the directory does not exist")
  if not (root / "config.json").exists():
    raise JaxlmError(f"no run in {workdir!r}: it has no config.json")
  return ml_collections.ConfigDict(json.loads(workdir_lib.read_text(root / "config.json")))


def abstract_params(model: model_lib.GPT, mesh: jax.sharding.Mesh,
                    rules: sharding.Rules) -> PyTree:
  """Shape/dtype/sharding of the model's params, without allocating them."""
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  return with_shardings(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules))


def load_params(source: str, target: PyTree, step: int | str | None = None) -> PyTree:
  """Params of the run in workdir `source` (its latest checkpoint), restored into `target`."""
  ckpt_dir = workdir_lib.path(source) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise JaxlmError(f"no checkpoint in {source!r} (looked for {ckpt_dir})")
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)
  try:
    return ckpt.restore(ckpt.resolve_step(step), {"params": target})["params"]
  finally:
    ckpt.close()


def load_run(workdir: str, step: int | str | None = None) -> Run:
  """Restores a run's params (latest, `step`, or 'best') onto this host's devices."""
  cfg = _read_run_config(workdir)
  tok = tokenizers.load(workdir_lib.path(workdir) / "tokenizer.json")
  model = model_lib.make_model(model_config(cfg, tok.vocab_size))
  # Whatever mesh trained it, restore onto the devices here (data parallel: replicated).
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  target = abstract_params(model, mesh, sharding.get_rules(cfg.mesh.rules))
  ckpt_dir = workdir_lib.path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise JaxlmError(f"no checkpoint in {workdir!r}: train it first (jaxlm train)")
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)
  try:
    resolved = ckpt.resolve_step(step)
    params = ckpt.restore(resolved, {"params": target})["params"]
  finally:
    ckpt.close()
  return Run(cfg=cfg, tokenizer=tok, model=model, params=params, step=resolved)


def evaluate_run(workdir: str, step: int | str | None = None,
                 eval_steps: int | None = None) -> dict[str, Any]:
  """Validation loss, perplexity and bits per token of a saved checkpoint."""
  if eval_steps is not None and eval_steps < 1:
    raise JaxlmError(f"--eval_steps must be >= 1, got {eval_steps}")
  run = load_run(workdir, step)
  cfg = run.cfg
  # Runs saved before data.vocab_size existed used no trained tokenizer.
  dataset = data_lib.load_dataset(cfg.data.path, cfg.data.tokenizer,
                                  val_fraction=cfg.data.val_fraction,
                                  block_size=cfg.model.block_size, cache_dir=cfg.data.cache_dir,
                                  vocab_size=cfg.data.get("vocab_size", 0))
  n = eval_steps or cfg.train.eval_steps
  # The same fixed batches as the evaluations during training, so the numbers compare.
  batches = evaluate.stack(
      data_lib.get_batch(dataset.val, seed=cfg.seed, step=i, batch_size=cfg.train.batch_size,
                         block_size=cfg.model.block_size, stream=data_lib.EVAL_VAL_STREAM)
      for i in range(n))
  eval_fn = jax.jit(functools.partial(evaluate.eval_steps, model=run.model))
  result = evaluate.evaluate(eval_fn, run.params, batches)
  return {"step": run.step, "tokens": n * cfg.train.batch_size * cfg.model.block_size,
          **{f"val/{k}": v for k, v in result.items()}}
