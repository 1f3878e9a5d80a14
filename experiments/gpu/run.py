"""One prepared run for a single NVIDIA GPU: attention check, benches, and a full training run.

  python experiments/gpu/run.py --out /tmp/gpu          # on the GPU machine, well under 8 min
  python experiments/gpu/run.py --dry_run --out /tmp/g  # on a CPU: the same steps, tiny sizes

1. cuDNN's fused attention against the XLA path: outputs and q/k/v gradients of one attention
   call in bfloat16, each compared with a float32 XLA reference. cuDNN passes when its error is
   at most twice XLA-bfloat16's own error plus 1e-3 (bfloat16 keeps 8 bits of mantissa, so
   both are off by about 2^-8 relative; the check says cuDNN adds no error beyond rounding).
2. `jaxlm bench` of GPT-2 small (block 1024, batch 16) and shakespeare_char_large, with each
   attention implementation the machine has (einsum, xla, cudnn): tokens/s, MFU, peak memory.
3. `jaxlm train` of shakespeare_char_large for its 5000 steps: the wall of training and the
   final val loss (nanoGPT's A100 reference: val 1.4697 in about 3 minutes).

Each step prints its rows as it goes and everything lands in OUT/results.json. The dry run
checks xla against einsum instead of cuDNN (a CPU has none) and runs a few steps of tiny
models: it proves the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def attention_check(dry_run: bool) -> list[dict]:
  import jax
  import jax.numpy as jnp

  B, L, H, K = (2, 128, 4, 64) if dry_run else (4, 1024, 12, 64)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (B, L, H, K), jnp.float32) for key in keys)

  def attn(impl, dtype):
    def f(q, k, v):
      return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                          is_causal=True, implementation=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return (out.astype(jnp.float32), *(x.astype(jnp.float32) for x in vjp(g.astype(out.dtype))))

  def einsum_attn(dtype):  # jaxlm's own formula, for the CPU dry run.
    def f(q, k, v):
      s = jnp.einsum("blhk,bshk->bhls", q.astype(dtype), k.astype(dtype),
                     preferred_element_type=jnp.float32) / jnp.sqrt(K)
      s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, jnp.finfo(jnp.float32).min)
      p = jax.nn.softmax(s, axis=-1).astype(dtype)
      return jnp.einsum("bhls,bshk->blhk", p, v.astype(dtype))
    out, vjp = jax.vjp(f, q, k, v)
    return (out.astype(jnp.float32), *(x.astype(jnp.float32) for x in vjp(g.astype(out.dtype))))

  reference = attn("xla", jnp.float32)
  baseline = attn("xla", jnp.bfloat16)
  candidate_name = "einsum" if dry_run else "cudnn"
  candidate = einsum_attn(jnp.bfloat16) if dry_run else attn("cudnn", jnp.bfloat16)
  rows = []
  for name, ref, base, cand in zip(("out", "dq", "dk", "dv"), reference, baseline, candidate,
                                   strict=True):
    base_err = float(jnp.abs(base - ref).max())
    cand_err = float(jnp.abs(cand - ref).max())
    rows.append({"tensor": name, "xla_bf16_err": base_err, f"{candidate_name}_bf16_err": cand_err,
                 "ok": cand_err <= 2 * base_err + 1e-3})
    print(f"attention {name:>3}: xla bf16 max err {base_err:.2e} | {candidate_name} bf16 "
          f"{cand_err:.2e} | {'ok' if rows[-1]['ok'] else 'FAIL'}", flush=True)
  return rows


def jaxlm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "jaxlm.cli", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def bench(config: str, impl: str, overrides: list[str], out: str, steps: int) -> dict:
  path = os.path.join(out, f"bench_{os.path.basename(config)[:-3]}_{impl}.json")
  proc = jaxlm("bench", "--config", config, "--steps", str(steps), "--nosampling",
               "--json_out", path, f"--config.model.attention_impl={impl}", *overrides)
  if proc.returncode != 0:
    why = (proc.stderr.strip().splitlines() or ["?"])[-1]
    print(f"bench {config} {impl}: failed ({why})", flush=True)
    return {"config": config, "impl": impl, "error": why}
  r = json.load(open(path))
  row = {"config": config, "impl": impl, "tokens_per_sec": r["tokens_per_sec_pipelined"],
         "mfu": r["mfu"], "step_ms": r["step_ms_pipelined"], "compile_s": r["compile_s"],
         "peak_memory_gib": r["peak_memory_bytes"] / 2**30, "device": r["device"]}
  print(f"bench {os.path.basename(config):<26} {impl:<7} {row['tokens_per_sec']:>12,.0f} tok/s "
        f"| MFU {100 * row['mfu']:5.1f}% | {row['step_ms']:8.2f} ms/step | peak "
        f"{row['peak_memory_gib']:.2f} GiB | compile {row['compile_s']:.1f}s", flush=True)
  return row


def train(out: str, dry_run: bool) -> dict:
  workdir = os.path.join(out, "sc_large")
  overrides = (["--config.train.steps=20", "--config.train.eval_every=10",
                "--config.train.eval_steps=2", "--config.model.n_layer=2",
                "--config.model.d_model=64", "--config.model.n_head=2",
                "--config.model.block_size=64", "--config.train.batch_size=4"]
               if dry_run else [])
  t0 = time.perf_counter()
  proc = jaxlm("train", "--config", "configs/shakespeare_char_large.py", "--workdir", workdir,
               *overrides, timeout=900)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    why = (proc.stderr.strip().splitlines() or ["?"])[-1]
    print(f"train: failed ({why})", flush=True)
    return {"error": why, "wall_sec": wall}
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  val = [r["val/loss"] for r in records if "val/loss" in r][-1]
  run_wall = [r["wall_time_sec"] for r in records if "wall_time_sec" in r][-1]
  logged = [r for r in records if "tokens_per_sec" in r]
  row = {"val_loss": val, "run_wall_sec": run_wall, "command_wall_sec": wall,
         "tokens_per_sec_last": logged[-1]["tokens_per_sec"], "mfu_last": logged[-1]["mfu"]}
  print(f"train shakespeare_char_large: val {val:.4f} | run wall {run_wall:.1f}s (command "
        f"{wall:.1f}s) | {row['tokens_per_sec_last']:,.0f} tok/s | MFU "
        f"{100 * row['mfu_last']:.1f}%", flush=True)
  return row


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory for results.json and the run")
  parser.add_argument("--dry_run", action="store_true", help="tiny sizes, for a CPU")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  import jax
  print(f"devices: {jax.devices()}", flush=True)
  results = {"devices": [d.device_kind for d in jax.devices()], "dry_run": args.dry_run}
  results["attention_check"] = attention_check(args.dry_run)

  small = (["--config.model.n_layer=2", "--config.model.d_model=64", "--config.model.n_head=2",
            "--config.model.block_size=128", "--config.model.vocab_size=256",
            "--config.train.batch_size=2", "--config.train.grad_accum=1"]
           if args.dry_run else ["--config.train.batch_size=16", "--config.train.grad_accum=1"])
  large = (["--config.model.n_layer=2", "--config.model.d_model=64", "--config.model.n_head=2",
            "--config.model.block_size=64", "--config.train.batch_size=4"]
           if args.dry_run else [])
  impls = ["einsum", "xla"] + ([] if args.dry_run else ["cudnn"])
  steps = 3 if args.dry_run else 30
  results["bench"] = []
  for config, overrides in (("configs/gpt2_small.py", small),
                            ("configs/shakespeare_char_large.py", large)):
    for impl in impls:
      # shakespeare_char_large has dropout 0.2, and the fused kernels have no dropout of the
      # attention probabilities: their rows time the model with dropout 0 (a bench times
      # steps; its loss does not matter). The training run below keeps the config's dropout.
      extra = (["--config.model.dropout=0"] if impl != "einsum" and "char_large" in config
               else [])
      results["bench"].append(bench(config, impl, overrides + extra, args.out, steps))
  results["train"] = train(args.out, args.dry_run)
  results["total_sec"] = time.perf_counter() - t0
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"done in {results['total_sec']:.0f}s -> {os.path.join(args.out, 'results.json')}")
  ok = all(r["ok"] for r in results["attention_check"]) and "error" not in results["train"]
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
