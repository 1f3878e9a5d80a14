"""Muon vs AdamW under sharding: step time, and the collectives Newton-Schulz adds under GSPMD.

  PYTHONPATH=. python experiments/muon_sharding/run.py [--steps 20] [--warmup 3]
      [--devices 1,8] [--batch_size 16]

For each device count the script starts one subprocess (XLA_FLAGS sets that many CPU devices;
mesh fsdp=N, rules fsdp, so parameters and optimizer state are sharded along embed) that
builds configs/shakespeare_char.py with optim.name adamw and then muon (the recipe: muon on
the blocks' matrices, adamw on the rest), side by side in the same process. Each compiles one
train step, counts the collectives in its compiled HLO (jitted.lower(...).compile().as_text())
with the bytes they move (split into the model's forward/backward pass and the update), runs
`warmup` steps, then times `steps` steps one by one and reports the median as ms/step and
tokens/s. Prints a markdown table and writes results.jsonl here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction "%name = f32[64,128]{1,0} all-reduce(...)" (or a tuple of shapes, or the
# async "-start" form): its result type and op.
INSTRUCTION = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
SHAPE = re.compile(r"(f32|bf16|f16|s32|u32|pred|s8|u8)\[([\d,]*)\]")
BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def collectives(hlo: str) -> dict[str, dict[str, dict[str, int]]]:
  """{part: {op: {"count": n, "bytes": bytes of their results}}} over the compiled module's
  text; part "model" = the forward and backward pass (an op_name inside DecoderLM), "update" =
  everything else: gradient clipping and the optimizer (Newton-Schulz for muon)."""
  out = {part: {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
         for part in ("model", "update")}
  for line in hlo.splitlines():
    match = INSTRUCTION.search(line)
    if not match:
      continue
    result, op = match.group(1), match.group(2)
    op_name = re.search(r'op_name="([^"]*)"', line)
    part = "model" if op_name and "DecoderLM" in op_name.group(1) else "update"
    out[part][op]["count"] += 1
    for dtype, dims in SHAPE.findall(result):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      out[part][op]["bytes"] += n * BYTES[dtype]
  return out


def worker(args: argparse.Namespace) -> None:
  """In a process with `args.devices` CPU devices: both optimizers, one JSON line each."""
  import jax
  import numpy as np

  from jaxlm import build as build_lib
  from jaxlm import sharding

  assert jax.device_count() == args.devices, jax.devices()
  spec = importlib.util.spec_from_file_location(
      "shakespeare_char", os.path.join(REPO, "configs", "shakespeare_char.py"))
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  for name in ("adamw", "muon"):
    cfg = config_module.get_config()
    cfg.optim.name = name
    cfg.train.batch_size = args.batch_size
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.rules = 1, args.devices, "fsdp"
    setup = build_lib.build(cfg, 65)
    training = setup.training
    tokens = np.random.default_rng(0).integers(0, 65, size=(1, args.batch_size,
                                                            cfg.model.block_size + 1))
    batch = sharding.host_to_global({"inputs": tokens[..., :-1].astype(np.int32),
                                     "targets": tokens[..., 1:].astype(np.int32)},
                                    training.batch_sharding)
    state = training.init(setup.init_rng)
    t0 = time.perf_counter()
    compiled = training.steps.lower(state, batch, setup.dropout_rng).compile()
    compile_s = time.perf_counter() - t0
    counts = collectives(compiled.as_text())
    times = []
    for i in range(args.warmup + args.steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch, setup.dropout_rng)
      jax.block_until_ready((state, metrics))
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(json.dumps({
        "devices": args.devices, "optimizer": name, "mesh": dict(setup.mesh.shape),
        "batch_size": args.batch_size, "block_size": cfg.model.block_size,
        "compile_s": round(compile_s, 2), "ms_per_step": round(1e3 * median, 2),
        "tokens_per_s": round(args.batch_size * cfg.model.block_size / median),
        "min_ms": round(1e3 * min(times), 2), "max_ms": round(1e3 * max(times), 2),
        "collectives": counts, "loss": float(metrics["loss"][-1])}), flush=True)


def table(rows: list[dict]) -> str:
  """Collectives as model + update (see `collectives`); MiB = the results' bytes per step."""
  lines = ["| devices | optimizer | ms/step (median) | tokens/s | compile s | all-gather | "
           "all-reduce | other collectives | collective MiB/step |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  def split(c: dict, ops: tuple[str, ...]) -> str:
    return " + ".join(str(sum(c[part][op]["count"] for op in ops)) for part in c)

  def mib(c: dict) -> str:
    return " + ".join(f"{sum(v['bytes'] for v in c[part].values()) / 2**20:.1f}" for part in c)

  other = ("reduce-scatter", "all-to-all", "collective-permute")
  for r in rows:
    c = r["collectives"]
    lines.append(f"| {r['devices']} | {r['optimizer']} | {r['ms_per_step']:.1f} | "
                 f"{r['tokens_per_s']:,} | {r['compile_s']:.1f} | {split(c, ('all-gather',))} | "
                 f"{split(c, ('all-reduce',))} | {split(c, other)} | {mib(c)} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--devices", default="1,8", help="comma-separated device counts")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    args.devices = int(args.devices)
    return worker(args)
  rows = []
  for n in [int(d) for d in args.devices.split(",")]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", "--devices", str(n),
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--batch_size", str(args.batch_size)],
        env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.exit(f"worker with {n} device(s) failed:\n{proc.stderr[-3000:]}")
    rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  with open(os.path.join(HERE, "results.jsonl"), "a", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({**r, "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
  print(table(rows))


if __name__ == "__main__":
  main()
