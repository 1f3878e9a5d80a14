"""Plots the downstream-task curves of a run: accuracy of each task (and CORE) and val loss.

  jaxlm train --config configs/shakespeare_char.py --workdir runs/tasks \
      --config.train.eval_tasks=shakespeare_next_line,shakespeare_last_word,shakespeare_complete_word
  python experiments/downstream_tasks/plot.py runs/tasks experiments/downstream_tasks/curve.png

Also prints the table of the README (step, val loss, each task's acc, CORE).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(workdir: str, out: str) -> None:
  records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  evals = [r for r in records if "tasks/core" in r]
  tasks = sorted({k.split("/")[1] for r in evals for k in r
                  if k.startswith("tasks/") and k.endswith("/acc")})
  steps = [r["step"] for r in evals]
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for t in tasks:
    ax.plot(steps, [r[f"tasks/{t}/acc"] for r in evals], marker="o", label=t)
  ax.plot(steps, [r["tasks/core"] for r in evals], marker="s", color="black", label="CORE")
  ax.axhline(0.25, color="grey", linestyle=":", label="chance (4 choices)")
  ax.set_xlabel("step")
  ax.set_ylabel("accuracy")
  ax.set_title("downstream tasks (held-out shakespeare)")
  ax.legend(fontsize=8)
  ax2.plot(steps, [r["val/loss"] for r in evals], marker="o")
  ax2.set_xlabel("step")
  ax2.set_ylabel("val loss (nats/char)")
  ax2.set_title("validation loss")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print("| step | val loss | " + " | ".join(tasks) + " | CORE |")
  print("|---" * (len(tasks) + 3) + "|")
  for r in evals:
    print(f"| {r['step']} | {r['val/loss']:.4f} | " +
          " | ".join(f"{r[f'tasks/{t}/acc']:.3f}" for t in tasks) + f" | {r['tasks/core']:.3f} |")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
