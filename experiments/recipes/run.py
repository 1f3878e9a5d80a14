"""Training recipes on the shipped corpus: the default (AdamW + cosine) against Muon + WSD and
against Muon + WSD with the architecture options, at equal steps and at equal training time.

  python experiments/recipes/run.py --workdir runs/recipes            # all runs, then the report
  python experiments/recipes/run.py --workdir runs/recipes --report   # the report of what ran

Every recipe is configs/shakespeare_char.py plus the command-line overrides in RECIPES, trained
by `jaxlm train` in its own process, one run at a time (so their step times compare). Phase 1
trains each for the experiment's 2000 steps. Phase 2 gives each the training time the default
took in phase 1: its steps are 2000 x (the default's median step time / its own), and its
schedule is stretched or shrunk to that many steps (a recipe within 3% of the default's speed
keeps its phase-1 run). Writes results.md (the tables),
results.json and curves.png (val loss against step and against training time) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(REPO, "configs", "shakespeare_char.py")
STEPS = 2000

# name -> overrides of configs/shakespeare_char.py (the flags of `jaxlm train`).
MUON_WSD = {
    "optim.name": "muon",
    "optim.schedule": "wsd",
}
ARCH = {
    "model.qk_norm": True,
    "model.logit_softcap": 15.0,
    "model.mlp": "relu2",
    "model.zero_init_proj": True,
}
# The default's lr (1e-3) is below its best at 2000 steps (3e-3: experiments/lr_sweep/), so
# every recipe also runs at 3e-3, and the comparison is of each at its better rate.
LR3 = {"optim.lr": 3e-3, "optim.min_lr": 3e-4}
RECIPES = {
    "default": {},
    "default_lr3e-3": LR3,
    # The schedule alone, to tell what muon adds from what wsd adds.
    "adamw_wsd_lr3e-3": {"optim.schedule": "wsd", **LR3},
    "muon_wsd": MUON_WSD,
    "muon_wsd_lr3e-3": {**MUON_WSD, **LR3},
    "muon_wsd_arch_lr3e-3": {**MUON_WSD, **ARCH, **LR3},
}


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def median_ms_per_step(records: list[dict]) -> float:
  # The first log interval holds compilation; the rest are steady-state steps.
  ms = [r["ms_per_step"] for r in records if "ms_per_step" in r][1:]
  return statistics.median(ms)


def train(name: str, overrides: dict, workdir: str) -> dict:
  """Runs one recipe to its end (or finds it finished) and returns its summary."""
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  cmd = [sys.executable, "-m", "jaxlm.cli", "train", f"--config={CONFIG}",
         f"--workdir={workdir}", *flags(overrides)]
  print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[3:])}", flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  records = read_metrics(workdir)
  evals = [r for r in records if "val/loss" in r]
  ms = median_ms_per_step(records)
  summary = dict(name=name, overrides=overrides, steps=evals[-1]["step"],
                 val_loss=evals[-1]["val/loss"], best_val_loss=min(r["val/loss"] for r in evals),
                 ms_per_step=ms, train_s=ms * evals[-1]["step"] / 1000, wall_s=wall)
  with open(done, "w") as f:
    json.dump(summary, f, indent=1)
  print(f"  val loss {summary['val_loss']:.4f}, {ms:.1f} ms/step, {wall:.0f} s wall", flush=True)
  return summary


def curve(workdir: str) -> tuple[list[int], list[float], list[float]]:
  """(steps, val losses, training seconds at each evaluation) of a finished run."""
  records = read_metrics(workdir)
  steps, losses, seconds = [], [], []
  elapsed, last_step = 0.0, 0
  for r in records:
    if "ms_per_step" in r:
      elapsed += r["ms_per_step"] * (r["step"] - last_step) / 1000
      last_step = r["step"]
    if "val/loss" in r:
      steps.append(r["step"])
      losses.append(r["val/loss"])
      seconds.append(elapsed)
  return steps, losses, seconds


def report(workdir: str, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = {}
  for phase in ("steps", "time"):
    for name in RECIPES:
      done = os.path.join(workdir, phase, name, "done.json")
      if os.path.exists(done):
        with open(done) as f:
          rows[phase, name] = json.load(f)
  lines = ["| recipe | overrides | steps | ms/step | training s | val loss (equal steps) "
           "| steps in the default's time | val loss (equal time) |",
           "|---|---|---|---|---|---|---|---|"]
  for name, overrides in RECIPES.items():
    a, b = rows.get(("steps", name)), rows.get(("time", name))
    if a is None:
      continue
    over = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "(configs/shakespeare_char.py)"
    equal_time = f"{b['steps']} | {b['val_loss']:.4f}" if b else "- | -"
    lines.append(f"| {name} | {over} | {a['steps']} | {a['ms_per_step']:.1f} | "
                 f"{a['train_s']:.0f} | {a['val_loss']:.4f} | {equal_time} |")
  table = "\n".join(lines)
  print(table)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({f"{p}/{n}": r for (p, n), r in rows.items()}, f, indent=1)

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for name in RECIPES:
    if ("steps", name) in rows:
      steps, losses, _ = curve(os.path.join(workdir, "steps", name))
      ax1.plot(steps, losses, marker=".", label=name)
    if ("time", name) in rows:
      _, losses, seconds = curve(os.path.join(workdir, "time", name))
      ax2.plot(seconds, losses, marker=".", label=name)
  for ax, title, xlabel in ((ax1, f"equal steps ({STEPS})", "step"),
                            (ax2, "equal training time", "training time (s, steps only)")):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss (nats/char)")
    ax.set_ylim(top=2.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=HERE, help="where results.md/json and curves.png go")
  parser.add_argument("--report", action="store_true", help="only report what already ran")
  parser.add_argument("--only", default="", help="comma-separated recipes to run (default all)")
  args = parser.parse_args()
  names = args.only.split(",") if args.only else list(RECIPES)
  if not args.report:
    phase1 = {n: train(n, RECIPES[n], os.path.join(args.workdir, "steps", n)) for n in names}
    budget_ms = phase1.get("default") or train(
        "default", RECIPES["default"], os.path.join(args.workdir, "steps", "default"))
    budget_ms = budget_ms["ms_per_step"] * STEPS
    for n in names:
      # Whole jitted calls (train.steps_per_call = 10 in the experiment).
      steps = 10 * round(budget_ms / phase1[n]["ms_per_step"] / 10)
      time_dir = os.path.join(args.workdir, "time", n)
      # The default itself, or a recipe as fast within the noise of step times (3%): phase 1
      # is already this run.
      if abs(steps - STEPS) <= 0.03 * STEPS:
        os.makedirs(os.path.dirname(time_dir), exist_ok=True)
        if not os.path.exists(time_dir):
          os.symlink(os.path.join("..", "steps", n), time_dir)
        continue
      train(n, {**RECIPES[n], "train.steps": steps}, time_dir)
  report(args.workdir, args.out)


if __name__ == "__main__":
  main()
