"""Decode speed: KV-cache sampling (jaxlm.sample) vs a full re-forward of the window per token.

  PYTHONPATH=. python experiments/sampling_bench/bench.py [--new_tokens 500] [--batch 1]

Both run the whole generation inside one jitted loop with the same sampling filters, on the
shakespeare_char_large architecture (6 x 384, block 256) with random parameters, so only the
attention bookkeeping differs. Compilation is excluded from the timings.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import sample

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 65  # tiny-shakespeare's character vocabulary.
FILTERS = dict(temperature=0.8, top_k=40, top_p=0.95)


def load_config(name: str):
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def naive_generate(params, prompt_BxP, rng, *, model, max_new_tokens):
  """nanoGPT's loop with static shapes: every token re-runs the model over the last
  block_size tokens (zero-padded while the sequence is shorter; causality ignores the pad)."""
  S = model.cfg.block_size
  B, P = prompt_BxP.shape
  tokens_BxT = jnp.pad(prompt_BxP, ((0, 0), (0, max(max_new_tokens, S))))

  def body(t, tokens_BxT):
    n = P + t  # Tokens so far.
    start = jnp.maximum(n - S, 0)
    window_BxS = jax.lax.dynamic_slice_in_dim(tokens_BxT, start, S, axis=1)
    logits_BxV = model.apply({"params": params}, window_BxS)[:, n - start - 1]
    token_B = sample.sample_token(logits_BxV, jax.random.fold_in(rng, t), **FILTERS)
    return jax.lax.dynamic_update_slice_in_dim(tokens_BxT, token_B[:, None], n, axis=1)

  tokens_BxT = jax.lax.fori_loop(0, max_new_tokens, body, tokens_BxT)
  return tokens_BxT[:, P:P + max_new_tokens]


def time_it(fn, *args, repeats: int) -> tuple[float, float, float]:
  """(compile seconds, best run wall seconds, CPU seconds of that run).

  CPU time (all threads of this process) is reported too because the machine may be shared:
  it counts the work done, where wall time also counts waiting for other processes."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  best = (float("inf"), 0.0)
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
  return compile_s, *best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="shakespeare_char_large")
  parser.add_argument("--new_tokens", type=int, default=500)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3, help="cached runs (best is reported)")
  parser.add_argument("--exact_crop", action="store_true",
                      help="also time the cache with slide_keep=block_size (nanoGPT's crop)")
  args = parser.parse_args()

  cfg = load_config(args.config)
  model = model_lib.make_model(config_lib.model_config(cfg, VOCAB))
  params = jax.jit(lambda r: nn.unbox(model_lib.init_params(model, r)))(jax.random.key(0))
  prompt_BxP = np.tile(np.array([[18, 27, 25, 17, 27, 10]], np.int32), (args.batch, 1))
  rng = jax.random.key(0)
  n = args.new_tokens
  print(f"{args.config}: {model_lib.count_params(params):,} params, block {model.cfg.block_size}, "
        f"batch {args.batch}, prompt {prompt_BxP.shape[1]} tokens, {n} new tokens, "
        f"{jax.devices()[0].device_kind} x {jax.device_count()}, {os.cpu_count()} CPUs")

  rows = []
  variants = [("kv cache (slide to 3/4 block)", 0, args.repeats)]
  if args.exact_crop:
    variants.append(("kv cache, exact crop (slide_keep=block)", model.cfg.block_size, 1))
  for name, keep, repeats in variants:
    fn = functools.partial(sample.generate, model=model, max_new_tokens=n, slide_keep=keep,
                           **FILTERS)
    rows.append((name, *time_it(fn, params, prompt_BxP, rng, repeats=repeats)))
  fn = functools.partial(naive_generate, model=model, max_new_tokens=n)
  rows.append(("naive full re-forward", *time_it(fn, params, prompt_BxP, rng, repeats=1)))

  naive_s, naive_cpu = rows[-1][2:]
  print(f"{'method':42s} {'compile s':>9s} {'decode s':>9s} {'tokens/s':>9s} {'speedup':>8s} "
        f"{'cpu s':>8s} {'cpu speedup':>11s}")
  for name, compile_s, run_s, cpu_s in rows:
    print(f"{name:42s} {compile_s:9.2f} {run_s:9.2f} {n * args.batch / run_s:9.1f} "
          f"{naive_s / run_s:7.1f}x {cpu_s:8.2f} {naive_cpu / cpu_s:10.1f}x")
  print(f"load average after the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
