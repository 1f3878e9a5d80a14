"""Loss vs learning rate per width, sp and mup side by side (the figure of the μP paper), and
where the optimum falls.

  python experiments/mup_transfer/plot.py runs/mup_transfer/results.csv experiments/mup_transfer

Reads the results.csv that `jaxlm sweep` writes for configs/sweeps/mup_transfer.py (columns
model.parametrization, model.d_model, optim.lr, final_val_loss), writes loss_vs_lr.png and
optima.md (the best lr per width and parametrization, and how many grid steps it moves from
the smallest width to the largest), and prints optima.md.
"""

from __future__ import annotations

import csv
import math
import os
import sys

PARAMETRIZATIONS = ("sp", "mup")


def read(path: str) -> dict[str, dict[int, dict[float, float]]]:
  """loss[parametrization][width][lr] of the finished trials (a NaN or missing loss is left
  out: a diverged trial has no optimum to offer)."""
  out: dict[str, dict[int, dict[float, float]]] = {p: {} for p in PARAMETRIZATIONS}
  with open(path) as f:
    for row in csv.DictReader(f):
      try:
        loss = float(row["final_val_loss"])
      except (TypeError, ValueError):
        continue
      if not math.isfinite(loss):
        continue
      width, lr = int(float(row["model.d_model"])), float(row["optim.lr"])
      out[row["model.parametrization"]].setdefault(width, {})[lr] = loss
  return out


def optima(loss: dict[str, dict[int, dict[float, float]]]) -> dict[str, dict[int, float]]:
  return {p: {w: min(by_lr, key=by_lr.get) for w, by_lr in sorted(loss[p].items())}
          for p in PARAMETRIZATIONS}


def table(loss, best) -> str:
  lrs = sorted({lr for p in loss.values() for by_lr in p.values() for lr in by_lr})
  lines = ["| parametrization | d_model | " + " | ".join(f"lr {lr:g}" for lr in lrs) +
           " | best lr |", "|---|---|" + "---|" * (len(lrs) + 1)]
  for p in PARAMETRIZATIONS:
    for w, by_lr in sorted(loss[p].items()):
      cells = [f"**{by_lr[lr]:.4f}**" if lr == best[p][w] else
               (f"{by_lr[lr]:.4f}" if lr in by_lr else "-") for lr in lrs]
      lines.append(f"| {p} | {w} | " + " | ".join(cells) + f" | {best[p][w]:g} |")
  lines.append("")
  for p in PARAMETRIZATIONS:
    if len(best[p]) < 2:
      continue
    widths = sorted(best[p])
    first, last = best[p][widths[0]], best[p][widths[-1]]
    steps = lrs.index(last) - lrs.index(first)
    lines.append(f"- {p}: the best lr goes from {first:g} at d_model {widths[0]} to {last:g} at "
                 f"d_model {widths[-1]}: {steps:+d} grid step(s) (grid: "
                 f"{', '.join(f'{lr:g}' for lr in lrs)})")
  return "\n".join(lines) + "\n"


def plot(loss, best, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axs = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, p in zip(axs, PARAMETRIZATIONS, strict=True):
    for w, by_lr in sorted(loss[p].items()):
      lrs = sorted(by_lr)
      (line,) = ax.plot(lrs, [by_lr[lr] for lr in lrs], marker="o", label=f"d_model {w}")
      ax.plot([best[p][w]], [by_lr[best[p][w]]], marker="*", markersize=14,
              color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("optim.lr (Adam)")
    ax.set_title("standard parametrization" if p == "sp" else "μP (base width 32)")
    ax.grid(alpha=0.3)
  axs[0].set_ylabel("final validation loss")
  axs[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
  csv_path, out = argv[0], argv[1] if len(argv) > 1 else "."
  loss = read(csv_path)
  best = optima(loss)
  os.makedirs(out, exist_ok=True)
  text = table(loss, best)
  with open(os.path.join(out, "optima.md"), "w") as f:
    f.write(text)
  plot(loss, best, os.path.join(out, "loss_vs_lr.png"))
  print(text, end="")


if __name__ == "__main__":
  main(sys.argv[1:])
