"""The whole default run, jaxlm against nanoGPT, back to back on this machine.

  python experiments/cpu_throughput/end_to_end.py --nanogpt /path/to/nanoGPT [--pairs 2]

Each pair runs, one after the other (odd pairs in this order, even pairs with nanoGPT last):
  1. nanoGPT's CPU shakespeare_char command (its README's "I only have a macbook" line);
  2. `jaxlm train --config configs/shakespeare_char.py` in a fresh workdir with empty caches
     (a new XDG_CACHE_HOME: no token cache, no compiled programs, no cached matmul peak);
  3. the same jaxlm command again in another fresh workdir, its caches now warm.
Every wall is the process' own, from launch to exit (imports and interpreter start included),
as a user waits for it. The ratios are jaxlm's wall over the nanoGPT wall of the same pair.
Results are printed and appended, one JSON object per pair, to --out; a row also names the
CPU model and core count, and gives nanoGPT's median step time from its own per-iteration log
(`step_ms_median`; jaxlm's steps are in its `phase/steps_sec`).

Without --nanogpt only the two jaxlm runs are timed. nanoGPT's shakespeare_char/prepare.py
downloads the corpus when its input.txt is missing; the shipped copy is put there first, so
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "jaxlm" / "corpora" / "tinyshakespeare.txt.xz"
NANOGPT_CMD = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
               "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]
JAXLM_CMD = [str(Path(sys.executable).parent / "jaxlm"), "train",
             "--config", str(REPO / "configs" / "shakespeare_char.py")]


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
  """(wall seconds, combined output) of one command; a failure stops the script."""
  t0 = time.perf_counter()
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  log.write_text(out.stdout + out.stderr)
  if out.returncode != 0:
    sys.exit(f"{' '.join(cmd)} exited {out.returncode}; its output is in {log}")
  return wall, out.stdout + out.stderr


def final_loss(pattern: str, out: str, who: str) -> float:
  found = re.findall(pattern, out)
  if not found:
    sys.exit(f"{who} printed no final val loss (pattern {pattern!r}); see its log")
  return float(found[-1])


def prepare_nanogpt(root: Path) -> None:
  data = root / "data" / "shakespeare_char"
  if not (data / "input.txt").exists():
    (data / "input.txt").write_bytes(lzma.decompress(CORPUS.read_bytes()))
  if not (data / "train.bin").exists():
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


def run_nanogpt(root: Path, scratch: Path) -> dict[str, float | None]:
  shutil.rmtree(root / "out-shakespeare-char", ignore_errors=True)
  wall, out = timed([sys.executable, *NANOGPT_CMD], root, dict(os.environ), scratch / "nanogpt.log")
  val = final_loss(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", out, "nanoGPT")
  # Its own per-iteration times, without the iterations that also evaluated (every 250th) and
  # the first 20 (warm-up): the step alone, to set beside jaxlm's phase/steps_sec / 2000.
  times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out)
           if int(it) > 20 and int(it) % 250]
  step_ms = statistics.median(times) if times else None
  return {"wall": wall, "val_loss": val, "step_ms_median": step_ms}


def run_jaxlm(cache: Path, scratch: Path, name: str) -> dict[str, float]:
  env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
  workdir = scratch / name
  wall, out = timed([*JAXLM_CMD, "--workdir", str(workdir)], REPO, env,
                    scratch / f"{name}.log")
  val = final_loss(r"final val loss ([\d.]+)", out, "jaxlm")
  result = {"wall": wall, "val_loss": val}
  phases = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  result.update({k: v for rec in phases for k, v in rec.items() if k.startswith("phase/")})
  return result


def cpu_model() -> str:
  """The CPU's model name (Linux), so rows from different machines can be told apart."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (karpathy/nanoGPT)")
  parser.add_argument("--pairs", type=int, default=1)
  parser.add_argument("--out", type=Path, default=Path(__file__).parent / "end_to_end.jsonl")
  args = parser.parse_args()
  if args.nanogpt is not None:
    if not (args.nanogpt / "train.py").exists():
      sys.exit(f"--nanogpt {args.nanogpt}: no train.py there; give a nanoGPT checkout")
    prepare_nanogpt(args.nanogpt)
  for i in range(args.pairs):
    with tempfile.TemporaryDirectory(prefix="jaxlm_e2e_") as tmp:
      scratch = Path(tmp)
      row: dict[str, object] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_model(),
                                "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
      # Odd pairs run nanoGPT first, even pairs last: neither side always follows the other.
      order = ["nanogpt", "jaxlm_cold", "jaxlm_warm"]
      if args.nanogpt is None:
        order.remove("nanogpt")
      elif i % 2:
        order = order[1:] + order[:1]
      for name in order:
        row[name] = (run_nanogpt(args.nanogpt, scratch) if name == "nanogpt" else
                     run_jaxlm(scratch / "cache", scratch, name))
        print(f"pair {i + 1}: {name:12s} {row[name]['wall']:6.1f} s  "
              f"val {row[name]['val_loss']:.4f}", flush=True)
      if "nanogpt" in row:
        row.update({f"ratio_{n[6:]}": row[n]["wall"] / row["nanogpt"]["wall"]
                    for n in ("jaxlm_cold", "jaxlm_warm")})
        print(f"pair {i + 1}: jaxlm / nanoGPT: cold {row['ratio_cold']:.3f}, warm "
              f"{row['ratio_warm']:.3f}", flush=True)
      row["load_after"] = os.getloadavg()[0]
      with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
