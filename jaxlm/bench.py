"""`jaxlm bench`: compile and time the real train step on the configured mesh; report MFU.

Also times sampling (prefill and decode tokens/s) and, with `--profile DIR`, traces a few
train steps with the JAX profiler and lists where the step time goes: the XLA ops of the
compiled step by time, named by the model code they come from (e.g. `h_*/attn/reduce_sum`,
backward). The trace stays in DIR for TensorBoard or Perfetto.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxlm import build as build_lib
from jaxlm import config as config_lib
from jaxlm import devices, metrics, sample, sharding
from jaxlm import model as model_lib
from jaxlm import phases as phases_lib
from jaxlm.host import allocator


def peak_memory_bytes() -> tuple[int, str]:
  """Peak device memory where the backend reports it, else the process' peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  # ru_maxrss is in KiB on Linux.
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def bench_train(cfg: ml_collections.ConfigDict, *, steps: int = 20, warmup: int = 3,
                profile_dir: str | None = None, sampling: bool = True,
                phases: phases_lib.Phases | None = None) -> dict[str, Any]:
  """Times `steps` train steps (after `warmup`) of `cfg` on random tokens, then sampling.

  With `profile_dir`, also traces a few more calls and adds the ops that took the most time
  ("profile", see `profile_ops`). "phases" splits the command's wall as a run's
  (jaxlm.phases; `phases` is the clock jaxlm bench started at its first import of jaxlm).
  """
  ph = phases or phases_lib.Phases(first="other")
  ph.enter("init")
  config_lib.validate_config(cfg)
  setup = build_lib.build(cfg, config_lib.resolve_vocab_size(cfg)[0])
  mcfg, model, mesh, training = setup.mcfg, setup.model, setup.mesh, setup.training
  state = training.init(setup.init_rng)
  n_proc = jax.process_count()
  tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, size=(
      cfg.train.batch_size // n_proc, mcfg.block_size + 1)).astype(np.int32)
  host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  # With train.steps_per_call = K, one call runs K steps (as the training loop does); times
  # below are per step, i.e. per call / K.
  per_call = cfg.train.steps_per_call
  stacked = {k: np.stack([v] * per_call) for k, v in host_batch.items()}
  batch = sharding.host_to_global(stacked, training.batch_sharding)
  rng = setup.dropout_rng  # As training draws dropout.

  ph.enter("peak")
  peak = metrics.peak_flops_total(mcfg.dtype, remeasure=True)  # Fresh, as bench measures.
  ph.enter("compile")
  t0 = time.perf_counter()
  step_fn = training.steps.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  ph.enter("steps")

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
  profile = None
  ph.enter("other")
  if profile_dir:
    state, profile = profile_ops(step_fn, state, batch, rng, profile_dir,
                                 calls=max(1, 10 // per_call),  # About 10 steps.
                                 steps_per_call=per_call)

  n_matmul = model_lib.matmul_params(jax.eval_shape(lambda: state.params))
  flops_per_token = metrics.flops_per_token(n_matmul, mcfg.n_layer, mcfg.d_model,
                                            mcfg.block_size, mcfg.layer_windows)
  tokens_per_step = cfg.train.batch_size * mcfg.block_size
  median = statistics.median(times)
  achieved = flops_per_token * tokens_per_step / median
  mem, mem_source = peak_memory_bytes()
  device = jax.devices()[0]
  ph.enter("sample")
  sampled = bench_sample(cfg, model, state.params) if sampling else {}
  ph.enter("other")
  return {
      "device": f"{jax.device_count()} x {device.device_kind}",
      "mesh": dict(mesh.shape),
      "params": model_lib.count_params(state.params),
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
      "peak_source": ("table" if devices.for_device_kind(device.device_kind)
                      else f"measured {mcfg.dtype} matmul"),
      "mfu": achieved / peak,
      "peak_memory_bytes": mem,
      "peak_memory_source": mem_source,
      "host_allocator": allocator.loaded(),
      **sampled,
      **({"profile": profile} if profile is not None else {}),
      "phases": ph.totals(),
  }


def bench_sample(cfg: ml_collections.ConfigDict, model: model_lib.DecoderLM,
                 params: Any) -> dict[str, Any]:
  """Prefill and decode speed of `jaxlm sample` with the config's sampling settings.

  The batch is train.batch_size // 4 rows (at least 1) of random half-block prompts; decoding
  produces sample.max_new_tokens per row (no end token, so every row runs to the end).
  """
  mcfg = model.cfg
  settings = sample.SampleSettings.from_config(cfg.sample, mcfg.vocab_size)
  sampler = sample.make_sampler(model, settings)
  B, P = max(1, cfg.train.batch_size // 4), max(1, mcfg.block_size // 2)
  prompt_BxP = np.random.default_rng(0).integers(0, mcfg.vocab_size, (B, P)).astype(np.int32)
  lengths_B = np.full((B,), P, np.int32)
  rng = jax.random.key(2)
  new = np.int32(settings.max_new_tokens)
  prefill = sampler.prefill.lower(params, prompt_BxP, lengths_B, rng).compile()
  abstract = jax.eval_shape(sampler.prefill, params, prompt_BxP, lengths_B, rng)
  decode = sampler.decode.lower(params, abstract, new).compile()
  jax.block_until_ready(decode(params, prefill(params, prompt_BxP, lengths_B, rng), new))
  prefill_s, decode_s = [], []
  for _ in range(3):
    t0 = time.perf_counter()
    state = jax.block_until_ready(prefill(params, prompt_BxP, lengths_B, rng))
    t1 = time.perf_counter()
    jax.block_until_ready(decode(params, state, new))
    prefill_s.append(t1 - t0)
    decode_s.append(time.perf_counter() - t1)
  return {
      "sample_batch": B,
      "sample_prompt_tokens": P,
      "sample_new_tokens": int(new),
      "sample_prefill_tokens_per_sec": B * P / statistics.median(prefill_s),
      "sample_decode_tokens_per_sec": B * int(new) / statistics.median(decode_s),
  }


def _hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
  """Instruction name -> {"kind", "source"} from the text of a compiled HLO module.

  kind is the opcode, or for a fusion the opcode of its root (dot, reduce, copy, ...); source
  is the JAX op_name the instruction came from, e.g. jit(train_step)/jvp(DecoderLM)/h_1/mlp/fc/...
  """
  roots = {}
  for m in re.finditer(r"^%(\S+) .*?\{\n(.*?)^\}", hlo_text, re.M | re.S):
    root = re.search(r"ROOT %\S+ = \S+ ([\w-]+)\(", m.group(2))
    if root:
      roots[m.group(1)] = root.group(1)
  ops = {}
  for m in re.finditer(r"^\s+(?:ROOT )?%(\S+) = \S+ ([\w-]+)\((.*)$", hlo_text, re.M):
    name, opcode, rest = m.groups()
    calls = re.search(r"calls=%([\w.-]+)", rest)
    source = re.search(r'op_name="([^"]*)"', rest)
    kind = roots.get(calls.group(1), opcode) if opcode == "fusion" and calls else opcode
    ops[name] = {"kind": kind, "source": source.group(1) if source else ""}
  return ops


def _short_source(source: str) -> str:
  """jit(train_step)/transpose(jvp(DecoderLM))/h_3/attn/reduce_sum -> h_*/attn/reduce_sum (bwd)."""
  backward = "transpose(" in source
  wrappers = ("jit(", "jvp(", "transpose(", "while", "body", "cond", "branch", "closed_call",
              "checkpoint", "remat")
  parts = [p for p in source.split("/") if not p.startswith(wrappers)]
  # Every unrolled block under one name (model.block_name(i) for any i).
  blocks = model_lib.BLOCKS
  name = re.sub(rf"\b{re.escape(blocks)}_\d+\b", f"{blocks}_*", "/".join(parts)) or "(no source)"
  return name + (" (bwd)" if backward else "")


def profile_ops(step_fn: Any, state: Any, batch: Any, rng: jax.Array, trace_dir: str, *,
                calls: int, steps_per_call: int, top: int = 15) -> tuple[Any, list[dict]]:
  """Traces `calls` calls of the compiled `step_fn`; returns (state, the `top` sources by time).

  Each entry sums the XLA ops that came from one line of model code (all layers together):
  ms per step, its share of the summed op time, how many ops and their kinds. Ops can run
  concurrently on a CPU, so the shares describe where work goes, not a wall-time partition.
  """
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  try:
    for _ in range(calls):
      state, m = step_fn(state, batch, rng)
      jax.block_until_ready(m)
  finally:
    jax.profiler.stop_trace()
  traces = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(max(traces, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  ops = _hlo_ops(step_fn.as_text())
  time_us, count, kinds = collections.Counter(), collections.Counter(), {}
  for e in events:
    op = ops.get(e.get("name", "")) if e.get("ph") == "X" else None
    if op is None:
      continue
    key = _short_source(op["source"])
    time_us[key] += e.get("dur", 0)
    count[key] += 1
    kinds.setdefault(key, collections.Counter())[op["kind"]] += 1
  steps = calls * steps_per_call
  total = sum(time_us.values()) or 1
  return state, [{"source": k, "ms_per_step": us / 1e3 / steps, "share": us / total,
                  "ops_per_step": count[k] / steps,
                  "kinds": ",".join(kd for kd, _ in kinds[k].most_common(3))}
                 for k, us in time_us.most_common(top)]


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
      f"peak memory       {r['peak_memory_bytes'] / 2**20:,.0f} MiB ({r['peak_memory_source']}; "
      f"malloc: {r['host_allocator']})",
      *([f"sampling          prefill {r['sample_prefill_tokens_per_sec']:,.0f} tokens/s, "
         f"decode {r['sample_decode_tokens_per_sec']:,.0f} tokens/s  (batch "
         f"{r['sample_batch']}, prompt {r['sample_prompt_tokens']}, "
         f"{r['sample_new_tokens']} new tokens)"] if "sample_batch" in r else []),
      *([f"phases            {phases_lib.format_totals(r['phases'])}"]
        if "phases" in r else []),
      *(["where the step time goes (summed XLA op time per step; ops may overlap):"]
        + [f"  {p['ms_per_step']:8.2f} ms  {100 * p['share']:5.1f}%  {p['ops_per_step']:5.1f} ops"
           f"  {p['source']}  [{p['kinds']}]" for p in r["profile"]]
        if "profile" in r else []),
  ])
