"""`jaxlm bench`: compile and time the real train step on the configured mesh; report MFU."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxlm import data as data_lib
from jaxlm import metrics, optim, sharding, train
from jaxlm import model as model_lib


def vocab_size(cfg: ml_collections.ConfigDict) -> int:
  """The config's vocab size, or the tokenizer's when it is derived (0)."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size
  dataset = data_lib.load_dataset(cfg.data.path, cfg.data.tokenizer,
                                  val_fraction=cfg.data.val_fraction,
                                  block_size=cfg.model.block_size, cache_dir=cfg.data.cache_dir,
                                  vocab_size=cfg.data.vocab_size)
  return dataset.tokenizer.vocab_size


def peak_memory_bytes() -> tuple[int, str]:
  """Peak device memory where the backend reports it, else the process' peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  # ru_maxrss is in KiB on Linux.
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def bench_train(cfg: ml_collections.ConfigDict, *, steps: int = 20,
                warmup: int = 3) -> dict[str, Any]:
  """Times `steps` train steps (after `warmup`) of `cfg` on random tokens."""
  train.validate_config(cfg)
  mcfg = train.model_config(cfg, vocab_size(cfg))
  mesh = sharding.make_mesh(dict(cfg.mesh.items()))
  rules = sharding.get_rules(cfg.mesh.rules)
  model = model_lib.make_model(mcfg)
  tx = optim.make_optimizer(cfg.optim, max(cfg.train.steps, 1))
  fns = train.make_sharded_training(model, tx, mesh, rules, grad_accum=cfg.train.grad_accum,
                                    z_loss=cfg.train.z_loss,
                                    layer_stats=cfg.train.log_params_every)
  state = fns.init(jax.random.key(cfg.seed))
  n_proc = jax.process_count()
  tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, size=(
      cfg.train.batch_size // n_proc, mcfg.block_size + 1)).astype(np.int32)
  host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  # With train.steps_per_call = K, one call runs K steps (as the training loop does); times
  # below are per step, i.e. per call / K.
  per_call = cfg.train.steps_per_call
  if per_call > 1:
    stacked = {k: np.stack([v] * per_call) for k, v in host_batch.items()}
    batch = sharding.host_to_global(stacked, fns.stacked_batch_sharding)
    fn = fns.steps
  else:
    batch = sharding.host_to_global(host_batch, fns.batch_sharding)
    fn = fns.step
  rng = jax.random.key(1)

  t0 = time.perf_counter()
  step_fn = fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0

  calls = max(1, steps // per_call)
  times = []
  for i in range(warmup + calls):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch, rng)
    jax.block_until_ready(m)
    if i >= warmup:
      times.append((time.perf_counter() - t0) / per_call)
  # Pipelined throughput: the loop as training runs it, one sync at the end.
  t0 = time.perf_counter()
  for _ in range(calls):
    state, m = step_fn(state, batch, rng)
  jax.block_until_ready(m)
  pipelined = (time.perf_counter() - t0) / (calls * per_call)

  n_matmul = train.matmul_params(jax.eval_shape(lambda: state.params))
  flops_per_token = metrics.flops_per_token(n_matmul, mcfg.n_layer, mcfg.d_model,
                                            mcfg.block_size)
  tokens_per_step = cfg.train.batch_size * mcfg.block_size
  median = statistics.median(times)
  achieved = flops_per_token * tokens_per_step / median
  peak = metrics.peak_flops_total(mcfg.dtype)
  mem, mem_source = peak_memory_bytes()
  device = jax.devices()[0]
  return {
      "device": f"{jax.device_count()} x {device.device_kind}",
      "mesh": dict(mesh.shape),
      "params": train.count_params(state.params),
      "tokens_per_step": tokens_per_step,
      "steps_per_call": per_call,
      "compile_s": compile_s,
      "step_ms_median": 1e3 * median,
      "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
      "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
      "step_ms_pipelined": 1e3 * pipelined,
      "tokens_per_sec": tokens_per_step / median,
      "tokens_per_sec_pipelined": tokens_per_step / pipelined,
      "flops_per_token": flops_per_token,
      "achieved_tflops": achieved / 1e12,
      "peak_tflops": peak / 1e12,
      "peak_source": ("table" if any(device.device_kind.startswith(k)
                                     for k in metrics.PEAK_TFLOPS)
                      else f"measured {mcfg.dtype} matmul"),
      "mfu": achieved / peak,
      "peak_memory_bytes": mem,
      "peak_memory_source": mem_source,
  }


def format_report(r: dict[str, Any]) -> str:
  return "\n".join([
      f"device            {r['device']}  mesh {r['mesh']}",
      f"parameters        {r['params']:,}  ({r['tokens_per_step']:,} tokens/step)",
      f"compile           {r['compile_s']:.2f} s",
      f"step time         median {r['step_ms_median']:.1f} ms  (p10 {r['step_ms_p10']:.1f}, "
      f"p90 {r['step_ms_p90']:.1f}; pipelined {r['step_ms_pipelined']:.1f})",
      f"throughput        {r['tokens_per_sec']:,.0f} tokens/s  (pipelined "
      f"{r['tokens_per_sec_pipelined']:,.0f})",
      f"model FLOPs       {r['flops_per_token']:.4g} per token  -> {r['achieved_tflops']:.3f} "
      f"TFLOP/s achieved",
      f"peak              {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})",
      f"MFU               {100 * r['mfu']:.1f}%",
      f"peak memory       {r['peak_memory_bytes'] / 2**20:,.0f} MiB ({r['peak_memory_source']})",
  ])
