"""The training loop: validate -> build -> restore or init -> compile -> loop; reads the config.

Everything it needs from below is a named piece (config, build, runs, step, preemption, run_log
for the step record and samples); what only the loop needs (batches by step, evaluation, saving)
is defined here, and each piece takes the train state as an argument.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jaxlm import build as build_lib
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import evaluate, metrics, mup, optim, run_log, runs, sharding, tokenizers, wandb_sink
from jaxlm import model as model_lib
from jaxlm import phases as phases_lib
from jaxlm import resume as resume_lib
from jaxlm import step as step_lib
from jaxlm import workdir as workdir_lib
from jaxlm.corpus import batches as batches_lib
from jaxlm.errors import JaxlmError
from jaxlm.host import allocator
from jaxlm.preemption import StopRequest
from jaxlm.step import TrainState
from jaxlm.tasks import suite as suite_lib


@dataclasses.dataclass(frozen=True)
class Batches:
  """This process' rows of any step's batch: a pure function of (seed, step, process)."""
  data: data_lib.Dataset | batches_lib.StoreData
  seed: int
  batch_size: int  # Global.
  block_size: int
  sharding: jax.sharding.NamedSharding  # Of K batches stacked on a leading axis.

  def _kw(self, step: int, **kw) -> dict[str, Any]:
    return {"seed": self.seed, "step": step, "batch_size": self.batch_size,
            "block_size": self.block_size, "process_index": jax.process_index(),
            "process_count": jax.process_count(), **kw}

  def train(self, step: int, k: int) -> dict[str, jax.Array]:
    """The training batches of steps step .. step + k - 1, stacked, as global arrays."""
    return sharding.host_to_global(evaluate.stack(
        self.data.train_batch(**self._kw(s)) for s in range(step, step + k)), self.sharding)

  def eval(self, n: int) -> dict[str, tuple[dict[str, jax.Array], int]]:
    """Per evaluation set: its fixed `n` batches (the same at every evaluation) and the UTF-8
    bytes their targets stand for in the global batch (for bits per byte)."""
    table = self.data.tokenizer.token_bytes()
    out = {}
    for name, fn in self.data.eval_sets().items():
      host = evaluate.stack(fn(**self._kw(i)) for i in range(n))
      if jax.process_count() == 1:
        n_bytes = int(table[host["targets"]].sum())
      else:  # Every process counts the bytes of the whole global batch, not of its rows.
        n_bytes = sum(int(table[fn(**self._kw(i, process_index=0, process_count=1))
                                ["targets"]].sum()) for i in range(n))
      out[name] = (sharding.host_to_global(host, self.sharding), n_bytes)
    return out


def check_optimizer(ckpt: checkpoint_lib.Checkpointer, step: int, opt_state: Any,
                    optim: dict[str, Any]) -> None:
  """An opt_state that does not fit the checkpoint's is an optimizer change (say adamw to
  sgd): named as such, with the keys that differ, rather than as a tree or shape mismatch."""
  try:
    if ckpt.shape_mismatch(step, "opt_state", opt_state) is None:
      return
    saved = ckpt.meta(step).get("config", {}).get("optim", {})
  except checkpoint_lib.DamagedCheckpoint:
    return  # restore_good names it and falls back.
  changed = [k for k, v in optim.items() if k in saved and saved[k] != v]
  changed = ["name"] if "name" in changed else changed
  if changed:
    workdir = ckpt.directory.parent
    raise JaxlmError(
        f"checkpoint {ckpt.directory}/{step} holds the state of another optimizer ("
        + ", ".join(f"optim.{k}={saved[k]!r} there, {optim[k]!r} here" for k in changed[:3])
        + f"); resume with the saved optim settings, or train in a new workdir with "
        f"--config.train.init_from={workdir}")


def restore_or_init(setup: build_lib.Setup, ckpt: checkpoint_lib.Checkpointer,
                    latest: int | None, init_from: str, optim: dict[str, Any]
                    ) -> tuple[TrainState, int | None]:
  """(state, its step) of the newest good checkpoint, else a fresh init (params from
  `init_from` if given) and None. A damaged step is skipped with a warning naming it."""
  target = setup.training.abstract_state
  if latest is not None:
    t0 = time.perf_counter()
    # A schedule-free run saves its evaluation params as "params" and the iterate it trains
    # as "train_params" (see `save`); training resumes from the latter.
    name = "train_params" if setup.recipe.schedule_free else "params"
    targets = {name: target.params, "opt_state": target.opt_state}
    check_optimizer(ckpt, latest, targets["opt_state"], optim)
    restored, latest = ckpt.restore_good("latest", targets)
    if not bool(step_lib.all_finite({k: restored[k] for k in (name, "opt_state")})):
      # Only a jaxlm from before issue 23 saved diverged states; resuming would only diverge.
      raise JaxlmError(f"checkpoint {ckpt.directory}/{latest} holds NaN or infinite values (a "
                       "diverged run); move that step's directory aside to resume from the "
                       "one before it")
    step = jax.device_put(jnp.asarray(latest, jnp.int32), setup.training.state_shardings.step)
    logging.info("resumed from checkpoint at step %d (%.2fs)", latest, time.perf_counter() - t0)
    return TrainState(step=step, params=restored[name], opt_state=restored["opt_state"]), latest
  state = setup.training.init(setup.init_rng)
  if init_from:
    params, _ = runs.restore_params(init_from, target.params)
    state = state.replace(params=params)
    logging.info("initialised params from %s", init_from)
  return state, None


def next_boundary(step: int, cfg: ml_collections.ConfigDict) -> int:
  """The next step at which the loop must stop to log, evaluate, save or finish."""
  t = cfg.train
  periods = [p for p in (t.log_every, t.eval_every, cfg.checkpoint.every, t.log_params_every,
                         cfg.sample.get("every", 0)) if p > 0]
  candidates = [(step // p + 1) * p for p in periods] + [t.steps]
  if t.stop_at > step:
    candidates.append(t.stop_at)
  return min(candidates)


def eval_results(training: build_lib.ShardedTraining, params: Any,
                 eval_batches: dict[str, tuple[dict[str, jax.Array], int]],
                 aliases: dict[str, str], step: int,
                 suite: suite_lib.Suite | None = None) -> dict[str, float]:
  """Loss, perplexity, bits per token and per byte on each set's fixed batches, and the
  downstream tasks' metrics (computed only: `write_eval` logs and writes them)."""
  results = {f"{name}/{k}": v for name, (batches, n_bytes) in eval_batches.items()
             for k, v in evaluate.evaluate(training.eval, params, batches, n_bytes).items()}
  for alias, name in aliases.items():
    results.update({f"{alias}/{k[len(name) + 1:]}": v for k, v in list(results.items())
                    if k.startswith(name + "/") and k.count("/") == name.count("/") + 1})
  if suite is not None:
    task_results = suite.evaluate(params)
    results.update(suite_lib.flatten(task_results))
    logging.info("tasks step %d | %s", step, suite_lib.summary(task_results))
  return results


def write_eval(results: dict[str, float], step: int, writer: metrics.MetricsWriter) -> None:
  writer.write(step, {("eval_" + k if k.startswith("train/") else k): v
                      for k, v in results.items()})
  writer.write_table(step, "eval/table", eval_table(results))
  per_source = "".join(f" | {k[4:-5]} {v:.4f}" for k, v in results.items()
                       if k.startswith("val/") and k.endswith("/loss") and k.count("/") == 2)
  logging.info("eval  step %d | train loss %.4f | val loss %.4f | val ppl %.2f | "
               "val bits/byte %.4f%s", step, results["train/loss"], results["val/loss"],
               results["val/perplexity"], results["val/bpb"], per_source)


def make_suite(cfg: ml_collections.ConfigDict, setup: build_lib.Setup,
               tokenizer: tokenizers.Tokenizer) -> suite_lib.Suite | None:
  """The train.eval_tasks, checked against the tokenizer and block size (before compiling)."""
  names = suite_lib.task_lib.parse_list(cfg.train.get("eval_tasks", ""))
  if not names:
    return None
  return suite_lib.Suite(names, setup.model, tokenizer, mesh=setup.mesh,
                         truncation=cfg.train.get("eval_tasks_truncation", "left"))


def eval_table(results: dict[str, float]) -> list[dict[str, Any]]:
  """run_eval's results as rows: one per evaluation set (train, val, val/<source>, ...),
  with a column per metric (loss, perplexity, bits_per_token, bpb)."""
  rows: dict[str, dict[str, Any]] = {}
  for key, value in results.items():
    name, metric = key.rsplit("/", 1)
    rows.setdefault(name, {"set": name})[metric] = value
  return list(rows.values())


def check_eval(results: dict[str, float], step: int, last_saved: int | None) -> None:
  """Stops the run at an evaluation whose loss is not finite, before anything is saved."""
  for name in ("val/loss", "train/loss"):
    if not math.isfinite(results[name]):
      raise step_lib.diverged(step, f"eval {name} is {results[name]}", last_saved)


def save(ckpt: checkpoint_lib.Checkpointer, training: build_lib.ShardedTraining,
         state: TrainState, step: int, meta: dict[str, Any], val_loss: float | None,
         last_saved: int | None = None) -> None:
  """"params" are what evaluation sees (every reader of a checkpoint loads them: eval, sample,
  convert, init_from); a schedule-free run adds the iterate it trains as "train_params".

  A state with a NaN or infinity anywhere is never saved: the run stops instead (a finite
  loss does not prove it, since the update after the last loss can overflow).
  """
  t0 = time.perf_counter()
  items = {"params": training.params_for_eval(state), "opt_state": state.opt_state}
  if training.eval_params is not None:
    items["train_params"] = state.params
  if not bool(step_lib.all_finite(items)):
    raise step_lib.diverged(step, "the params or optimizer state hold a NaN or infinity",
                            last_saved)
  ckpt.save(step, items, meta, val_loss=val_loss)
  logging.info("saving checkpoint at step %d (async; %.2fs blocking)", step,
               time.perf_counter() - t0)


def log_setup(cfg: ml_collections.ConfigDict, setup: build_lib.Setup,
              dataset: data_lib.Dataset | batches_lib.StoreData, params: Any,
              ph: phases_lib.Phases) -> None:
  mcfg, n_proc = setup.mcfg, jax.process_count()
  logging.info("process %d of %d: %d of %d devices; mesh %s; this process holds %s",
               jax.process_index(), n_proc, jax.local_device_count(), jax.device_count(),
               dict(setup.mesh.shape), sharding.local_position(setup.mesh))
  with ph("peak"):  # Measured once per machine on CPU, then read from its cache (metrics.py).
    peak = metrics.peak_flops_total(mcfg.dtype)
  n_matmul = model_lib.matmul_params(params)
  logging.info("config:\n%s", cfg)
  logging.info("data: %s", dataset.summary())
  for line in dataset.mixture(cfg.train.steps, cfg.train.batch_size):
    logging.info("mixture: %s", line)
  logging.info("model: %s parameters (%s in matmuls) | %.3g FLOPs/token | %d layers, "
               "d_model %d, %d heads, block %d", f"{model_lib.count_params(params):,}",
               f"{n_matmul:,}", metrics.flops_per_token(n_matmul, mcfg.n_layer, mcfg.d_model,
                                                        mcfg.block_size, mcfg.layer_windows),
               mcfg.n_layer, mcfg.d_model, mcfg.n_head, mcfg.block_size)
  if mup.enabled(mcfg):
    logging.info("%s", mup.describe(mcfg))
  for line in optim.describe(cfg.optim, setup.recipe.groups, params):
    logging.info("optimizer group %s", line)
  logging.info("devices: %d x %s on %d process(es) | mesh %s | rules %s | batch %d global, "
               "%d per process, %d tokens/step | peak %.1f TFLOP/s | malloc %s",
               jax.device_count(), jax.devices()[0].device_kind, n_proc,
               dict(setup.mesh.shape), cfg.mesh.rules, cfg.train.batch_size,
               cfg.train.batch_size // n_proc, cfg.train.batch_size * mcfg.block_size,
               peak / 1e12, allocator.loaded())


def compile_steps(training: build_lib.ShardedTraining, state: TrainState, batches_KxB: Any,
                  rng: jax.Array) -> Any:
  """The K-step train call compiled ahead of time, so errors and compile time show before the
  loop (K = train.steps_per_call, the leading axis of `batches_KxB`)."""
  t0 = time.perf_counter()
  steps_fn = training.steps.lower(state, batches_KxB, rng).compile()
  per_call = jax.tree.leaves(batches_KxB)[0].shape[0]
  logging.info("compiled train step%s in %.2fs",
               f" ({per_call} steps per call)" if per_call > 1 else "",
               time.perf_counter() - t0)
  return steps_fn


def compile_programs(cfg: ml_collections.ConfigDict, setup: build_lib.Setup, state: TrainState,
                     batches: Batches, samples: run_log.SampleLog, suite: Any,
                     aliases: dict[str, str]) -> tuple[Any, Any, dict[str, float] | None, Any]:
  """The train call compiled on this thread while a second one compiles the evaluation and
  the sampler by running them on `state`. XLA compiles outside the GIL, so their compiles
  overlap the train step's (tracing, which holds it, does not). Returns the train call, the
  eval batches, and the results at `state`: the evaluation (None unless one is due at step
  0) and a sample (written only if one is due; else it only compiled the sampler)."""
  training, step = setup.training, int(state.step)
  eval_batches = batches.eval(cfg.train.eval_steps)
  params = training.params_for_eval(state)

  def first_eval_and_sample():
    results = (eval_results(training, params, eval_batches, aliases, step, suite)
               if cfg.train.eval_every and step == 0 else None)
    return results, samples.generate(step, params)

  with futures.ThreadPoolExecutor(1, thread_name_prefix="jaxlm-compile") as pool:
    first = pool.submit(first_eval_and_sample)
    steps_fn = compile_steps(training, state, batches.train(step, cfg.train.steps_per_call),
                             setup.dropout_rng)
    results, sample = first.result()
  return steps_fn, eval_batches, results, sample


@dataclasses.dataclass
class Boundaries:
  """What the loop does when it stops between calls: evaluate, sample, save; each timed as
  its phase, after the steps before it have finished (their time is the steps')."""
  training: build_lib.ShardedTraining
  eval_batches: Any
  aliases: dict[str, str]
  suite: Any
  writer: metrics.MetricsWriter
  samples: run_log.SampleLog
  ckpt: checkpoint_lib.Checkpointer
  ckpt_meta: dict[str, Any]
  step_log: run_log.StepLog
  ph: phases_lib.Phases

  def evaluate(self, state: TrainState, step: int, last_saved: int | None,
               results: dict[str, float] | None = None) -> dict[str, float]:
    """An evaluation, written; a diverged one stops the run before anything is saved."""
    jax.block_until_ready(state)
    with self.ph("eval"):
      if results is None:
        results = eval_results(self.training, self.training.params_for_eval(state),
                               self.eval_batches, self.aliases, step, self.suite)
      write_eval(results, step, self.writer)
      check_eval(results, step, last_saved)
    return results

  def sample(self, state: TrainState, step: int) -> None:
    jax.block_until_ready(state)
    with self.ph("sample"):
      self.samples.write(step, self.training.params_for_eval(state))

  def save(self, state: TrainState, step: int, val_loss: float | None,
           last_saved: int | None) -> None:
    jax.block_until_ready(state)
    with self.ph("save"):
      save(self.ckpt, self.training, state, step, {**self.ckpt_meta, **self.step_log.meta()},
           val_loss, last_saved)


def open_records(cfg: ml_collections.ConfigDict, setup: build_lib.Setup, state: TrainState,
                 workdir: str, resolved: dict[str, Any], samples: run_log.SampleLog,
                 ckpt: checkpoint_lib.Checkpointer, latest: int | None,
                 ) -> tuple[metrics.MetricsWriter, run_log.StepLog]:
  """The run's metrics writer and step log, and its samples.txt, continuing those of the
  checkpoint at `latest` (if any) so that each step's records are written once and each
  logged value is the one an uninterrupted run logs (see MetricsWriter, SampleLog.resume and
  StepLog's `held` losses)."""
  is_main = jax.process_index() == 0
  samples.resume(latest, is_main)
  writer = metrics.MetricsWriter(workdir, enabled=is_main, resumed_from=latest,
                                 wandb=wandb_sink.settings(cfg, workdir, resolved))
  meta = None if latest is None else ckpt.meta(latest)
  return writer, run_log.StepLog(cfg, setup, state.params, writer, int(state.step), meta)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       phases: phases_lib.Phases | None = None) -> dict[str, Any]:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns final metrics.
  `phases` (jaxlm train's starts at its first import of jaxlm) is logged and written at the end."""
  t_start = time.perf_counter()
  ph = phases or phases_lib.Phases(start=t_start, first="other")
  ph.enter("other")
  config_lib.validate_config(cfg)
  root = workdir_lib.prepare(workdir)  # A local path or gs:// URL (see workdir.py).
  is_main = jax.process_index() == 0
  # A resume: its changes checked before any data is read, its own tokenizer (resume.py).
  prior = resume_lib.open_run(workdir, cfg)
  ph.enter("data")
  dataset = resume_lib.load_dataset(cfg, prior)
  ph.enter("init")
  setup = build_lib.build(cfg, dataset.tokenizer.vocab_size)
  training, total_steps, per_call = setup.training, cfg.train.steps, cfg.train.steps_per_call
  batches = Batches(dataset, cfg.seed, cfg.train.batch_size, setup.mcfg.block_size,
                    training.batch_sharding)
  samples = run_log.SampleLog(cfg, setup.model, dataset.tokenizer, root / "samples.txt")
  suite, aliases = make_suite(cfg, setup, dataset.tokenizer), dataset.aliases()

  # --- Restore or init. Nothing in the workdir changes before the run is known to proceed
  # (restored and compiled): a refused resume leaves config.json describing the saved run.
  resolved = config_lib.resolved_dict(cfg, setup.mcfg)
  ckpt, latest = prior.ckpt, prior.latest
  ckpt_meta = resume_lib.checkpoint_meta(resolved, dataset)
  # SIGTERM during the restore, compile or step-0 eval stops after the first call (a save).
  stop = StopRequest()
  state, latest = restore_or_init(setup, ckpt, latest, cfg.train.init_from, resolved["optim"])
  log_setup(cfg, setup, dataset, state.params, ph)

  # --- Compile ahead of time, so errors and compile time show before the loop. Calls run
  # K = steps_per_call steps, or one step at a time up to a boundary K does not divide.
  step = int(state.step)
  with ph("compile"):
    steps_fn, eval_batches, first_eval, first_sample = compile_programs(
        cfg, setup, state, batches, samples, suite, aliases)
  if is_main:  # The first writes to the workdir (the writer's files and W&B's id come next).
    resume_lib.write_run(root, dataset.tokenizer, resolved, prior)
  writer, step_log = open_records(cfg, setup, state, workdir, resolved, samples, ckpt, latest)
  at = Boundaries(training, eval_batches, aliases, suite, writer, samples, ckpt, ckpt_meta,
                  step_log, ph)

  final = {} if first_eval is None else at.evaluate(state, step, latest, first_eval)
  if cfg.sample.every and step == 0:
    samples.append(step, first_sample)
  last_saved, stopped_early = latest, False
  try:
    ph.enter("steps")
    while step < total_steps:
      # Dispatch is asynchronous: the host builds the next batches while the device computes.
      k = per_call if next_boundary(step, cfg) - step >= per_call else 1
      state, step_metrics = (steps_fn if k == per_call else training.steps)(
          state, batches.train(step, k), setup.dropout_rng)
      step += k
      step_log.add(step_metrics)
      done = step == total_steps
      stopping = stop.should_stop(step) or step == cfg.train.stop_at
      logged = step % cfg.train.log_every == 0 or done  # A stop only prints (see flush).
      evaluated = cfg.train.eval_every and (step % cfg.train.eval_every == 0 or done)
      sampled = cfg.sample.every and step % cfg.sample.every == 0
      saving = done or stopping or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
      # A diverged run stops at its first non-finite loss, before it logs, evaluates or saves
      # anything of that state, so the checkpoints it keeps are all finite.
      if (logged or evaluated or saving) and (bad := step_log.first_nonfinite()):
        raise step_lib.diverged(bad[0], f"loss is {bad[1]}", last_saved)
      if logged or stopping:
        step_log.flush(step, record=logged)
      if evaluated:
        final = at.evaluate(state, step, last_saved)
      if sampled:
        at.sample(state, step)
      if saving:
        at.save(state, step, final["val/loss"] if evaluated else None, last_saved)
        last_saved = step
      if evaluated or sampled or last_saved == step:
        step_log.restart_clock(step)
      if stopping:
        stopped_early = not done
        break
    if last_saved != step:  # E.g. train.steps = 0: still one.
      at.save(state, step, None, last_saved)
  except BaseException:
    writer.close(failed=True)
    raise
  finally:
    stop.restore()
    with ph("save"):
      ckpt.wait()  # Every started save completes (or the process dies and it never counts).
      ckpt.close()
  with writer:  # Open until the wall-time record, so that every sink (W&B too) gets it.
    if not stopped_early:
      at.sample(state, step)
    ph.enter("other")
    wall = time.perf_counter() - t_start
    writer.write(step, {"wall_time_sec": wall, **ph.record()})
  finish_log(cfg, step, stop, stopped_early, wall, final, ph)
  return {**final, "wall_time_sec": wall, "step": step, "stopped_early": stopped_early}


def finish_log(cfg: ml_collections.ConfigDict, step: int, stop: StopRequest,
               stopped_early: bool, wall: float, final: dict[str, float],
               ph: phases_lib.Phases) -> None:
  if stopped_early:
    why = stop.signal_name or f"train.stop_at={cfg.train.stop_at}"
    logging.info("stopped at step %d/%d (%s) with a checkpoint; run the same command to resume",
                 step, cfg.train.steps, why)
  logging.info("phases: %s", ph.summary())
  logging.info("done: %d steps in %s (%.1fs wall, compile and evals included)%s", step,
               metrics.format_duration(wall), wall,
               f" | final val loss {final['val/loss']:.4f}" if final else "")
