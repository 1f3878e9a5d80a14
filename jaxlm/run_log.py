"""What a run writes as it trains: the step record (metrics.jsonl, TensorBoard, W&B, the log
line with throughput and ETA) and the samples appended to samples.txt."""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxlm import build as build_lib
from jaxlm import metrics, optim, sample, tokenizers
from jaxlm import model as model_lib
from jaxlm import workdir as workdir_lib

SAMPLE_RNG_STREAM = 3  # samples.txt at step s uses fold_in(fold_in(key(seed), 3), s).


PENDING_LOSSES = "pending_losses"  # Checkpoint meta: the losses of the unlogged steps.


class SampleLog:
  """Appends a sample from the given params to samples.txt, at most once per step."""

  def __init__(self, cfg: ml_collections.ConfigDict, model: model_lib.DecoderLM,
               tokenizer: tokenizers.Tokenizer, path: Any):
    self.sampler = sample.make_sampler(model, sample.SampleSettings.from_config(
        cfg.sample, tokenizer.vocab_size))
    self.prompt, self.tokenizer, self.path = cfg.sample.prompt, tokenizer, path
    # A bad prompt, or a sample.max_new_tokens too large for memory, fails before compiling.
    prompt_BxP, _ = sample.encode_prompts(tokenizer, [self.prompt])
    sample.check_fits(self.sampler.settings, model.cfg, 1, prompt_BxP.shape[1])
    self.rng = jax.random.fold_in(jax.random.key(cfg.seed), SAMPLE_RNG_STREAM)
    self.last_step = -1

  def resume(self, step: int | None, enabled: bool) -> None:
    """A run resumed from checkpoint `step` samples only later steps (the earlier attempt
    sampled those before it); samples.txt's entries past `step`, from an attempt that died
    after its last checkpoint, are dropped, since this run writes them again."""
    if step is None:
      return
    self.last_step = step
    if enabled and self.path.exists():
      text = workdir_lib.read_text(self.path)
      cut = next((m.start() for m in re.finditer(r"^== step (\d+) ==$", text, re.M)
                  if int(m.group(1)) > step), None)
      if cut is not None:
        workdir_lib.write_text(self.path, text[:cut])

  def generate(self, step: int, params: Any) -> sample.SampleResult:
    """The sample of `params` at `step` (every process takes part; nothing is written)."""
    return sample.sample_text(self.sampler, params, self.tokenizer, [self.prompt],
                              jax.random.fold_in(self.rng, step))

  def append(self, step: int, result: sample.SampleResult) -> None:
    """Writes `result` (generate's, of this step) to samples.txt, at most once per step."""
    if step <= self.last_step:
      return
    self.last_step = step
    if jax.process_index() == 0:  # The params may be sharded across processes: all sample.
      sample.append_samples(self.path, step, self.prompt, result.texts)
    logging.info("sample  step %d | %d tokens at %.0f tokens/s -> samples.txt", step,
                 result.num_tokens, result.tokens_per_sec)

  def write(self, step: int, params: Any) -> None:
    if step > self.last_step:
      self.append(step, self.generate(step, params))


class StepLog:
  """Training metrics stay on the device between log steps; a log step fetches and writes them."""

  def __init__(self, cfg: ml_collections.ConfigDict, setup: build_lib.Setup, params: Any,
               writer: metrics.MetricsWriter, step: int, meta: dict[str, Any] | None = None):
    mcfg = setup.mcfg
    self.cfg, self.schedule, self.writer = cfg, setup.recipe.schedule, writer
    # Metric name -> (optimizer, lr_mult): each group's own lr besides the shared "lr".
    self.group_lrs = {f"lr/{g.name}": (g.optimizer, g.lr_mult) for g in setup.recipe.groups}
    if not setup.recipe.groups and cfg.optim.name in optim.SCHEDULE_FREE:
      self.group_lrs["lr"] = (cfg.optim.name, 1.0)
    self.tokens_per_step = cfg.train.batch_size * mcfg.block_size
    self.flops_per_token = metrics.flops_per_token(model_lib.matmul_params(params),
                                                   mcfg.n_layer, mcfg.d_model, mcfg.block_size,
                                                   mcfg.layer_windows)
    self.peak_flops = metrics.peak_flops_total(mcfg.dtype)
    self.pending: list[dict[str, jax.Array]] = []
    self.first = step  # The pending losses are those of steps first + 1, first + 2, ...
    # The losses of the steps before `step` since the last log (from the checkpoint a resumed
    # run restored): the resumed run's first record averages them with its own, so it equals
    # the record an uninterrupted run writes.
    self.held = np.asarray((meta or {}).get(PENDING_LOSSES, []), np.float32)
    self.layer_stats: dict[str, jax.Array] = {}
    self.restart_clock(step)

  def restart_clock(self, step: int) -> None:
    """Keeps what happened since the last log (evaluation, saving) out of throughput numbers."""
    self.t, self.step = time.perf_counter(), step

  def add(self, step_metrics: dict[str, jax.Array]) -> None:
    # Per-layer stats stay on the device; only a log_params_every step fetches them.
    self.layer_stats = {k: step_metrics.pop(k) for k in list(step_metrics)
                        if k.startswith(metrics.LAYER_STAT_PREFIXES)}
    self.pending.append(step_metrics)

  def first_nonfinite(self) -> tuple[int, float] | None:
    """(step, loss) of the first pending step whose loss is NaN or infinite, else None.

    Called before any log, evaluation or save: it fetches only the pending losses (a few
    floats, already on the device), so steps between those points stay free of host syncs.
    """
    if not self.pending:
      return None
    losses = np.concatenate(jax.device_get([m["loss"] for m in self.pending]))
    bad = np.flatnonzero(~np.isfinite(losses))
    return (self.first + 1 + int(bad[0]), float(losses[bad[0]])) if bad.size else None

  def losses(self) -> np.ndarray:
    """The losses not yet in a record: held ones, then the pending steps' (fetched)."""
    return np.concatenate([self.held] + jax.device_get([m["loss"] for m in self.pending]))

  def meta(self) -> dict[str, Any]:
    """For the checkpoint's meta: what a run resumed from it needs to log as this one would."""
    return {PENDING_LOSSES: [float(x) for x in self.losses()]}

  def flush(self, step: int, record: bool = True) -> None:
    """Logs the steps since the last record; `record=False` (a stop between log steps) only
    prints them: they stay pending, for the checkpoint's meta, and the resumed run writes the
    interval's record whole at its log step (as an uninterrupted run does)."""
    # With first_nonfinite just before it, the only host sync of a training step.
    fetched = jax.device_get(self.pending)
    loss = float(np.mean(np.concatenate([self.held] + [m["loss"] for m in fetched])))
    now = time.perf_counter()
    sec_per_step = (now - self.t) / (step - self.step)
    self.restart_clock(step)
    if not record:
      logging.info("stop  step %d | loss %.4f over the %d steps since the last record (kept "
                   "in the checkpoint for the resumed run's next record)", step, loss,
                   len(self.losses()))
      return
    self.pending, self.first, self.held = [], step, self.held[:0]
    tokens_per_sec = self.tokens_per_step / sec_per_step
    mfu = self.flops_per_token * tokens_per_sec / self.peak_flops
    lr = float(self.schedule(step - 1))
    total = max(self.cfg.train.steps, 1)
    lrs = {name: float(optim.lr_at(self.cfg.optim, total, opt, mult, np.asarray([step - 1]))[0])
           for name, (opt, mult) in self.group_lrs.items()}
    lr = lrs.get("lr", lr)
    every = self.cfg.train.log_params_every
    layer_record = ({k: v[-1] for k, v in jax.device_get(self.layer_stats).items()}
                    if every and step % every == 0 else {})
    self.writer.write(step, {"train/loss": loss, "lr": lr,
                             "grad_norm": float(fetched[-1]["grad_norm"][-1]),
                             "param_norm": float(fetched[-1]["param_norm"][-1]),
                             "tokens_per_sec": tokens_per_sec,
                             "ms_per_step": 1e3 * sec_per_step, "mfu": mfu, **lrs,
                             **layer_record})
    total = self.cfg.train.steps
    logging.info("step %d/%d | loss %.4f | lr %.2e | %s tok/s | %.1f ms/step | MFU %.1f%% "
                 "| ETA %s", step, total, loss, lr, f"{tokens_per_sec:,.0f}",
                 1e3 * sec_per_step, 100 * mfu,
                 metrics.format_duration((total - step) * sec_per_step))
