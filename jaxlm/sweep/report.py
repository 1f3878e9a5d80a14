"""Results: results.csv, results.md and PNG plots, rebuilt from the trial directories alone.

`summarize` works on any sweep workdir, local or gs://, finished or not (jaxlm sweep
--summarize); metrics (for durations) and matplotlib are imported only when writing.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError
from jaxlm.sweep.overrides import short
from jaxlm.sweep.state import METRIC, STATE_FILE, read_metrics, read_state


def collect(workdir: str) -> list[dict[str, Any]]:
  """One row per trial directory of `workdir`: finished trials first, by final val loss."""
  root = workdir_lib.path(workdir)
  if not root.is_dir():
    raise JaxlmError(f"no sweep in {workdir!r}: the directory does not exist")
  rows = []
  for entry in sorted(p.name for p in root.iterdir()):
    trial_dir = os.fspath(root / entry)
    state = read_state(trial_dir)
    if state is None:
      continue
    records = read_metrics(trial_dir)
    vals = [r[METRIC] for r in records if isinstance(r.get(METRIC), (int, float))]
    finite = [v for v in vals if math.isfinite(v)]  # A diverged trial's NaN is never a best.
    speeds = [r["tokens_per_sec"] for r in records
              if isinstance(r.get("tokens_per_sec"), (int, float))]
    walls = [r["wall_time_sec"] for r in records if "wall_time_sec" in r]
    rows.append({
        "trial": state["name"], "status": state["status"], "error": state.get("error") or "",
        "overrides": state.get("overrides", {}),
        "final_val_loss": float(vals[-1]) if vals else None,
        "best_val_loss": float(min(finite)) if finite else None,
        "steps": max((r["step"] for r in records), default=None),
        # Median over log intervals: robust to the odd slow interval on a shared machine.
        "tokens_per_sec": float(np.median(speeds)) if speeds else None,
        "wall_time_sec": float(sum(walls)) if walls else None,  # Summed over resumptions.
        "attempts": state.get("attempts", 0), "dir": trial_dir, "records": records})
  if not rows:
    raise JaxlmError(f"no trials in {workdir!r}: none of its directories has a {STATE_FILE}")
  # A pruned, interrupted or failed trial's last val loss is partial: it ranks after the others.
  # A NaN one ranks with the trials that have none (NaN compares false with everything, which
  # would leave it wherever the directory listing put it, first included).
  ranked = lambda r: r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])
  rows.sort(key=lambda r: (not ranked(r), r["status"] != "done",
                           r["final_val_loss"] if ranked(r) else 0.0, r["trial"]))
  return rows


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
  keys: list[str] = []
  for row in sorted(rows, key=lambda r: r["trial"]):
    keys.extend(k for k in row["overrides"] if k not in keys)
  return keys


CSV_COLUMNS = ("final_val_loss", "best_val_loss", "steps", "tokens_per_sec", "wall_time_sec",
               "status", "error")


def summarize(workdir: str) -> list[dict[str, Any]]:
  """Writes results.csv, results.md and the plots of `workdir`; returns the rows."""
  rows = collect(workdir)
  keys = swept_keys(rows)
  _write_csv(os.path.join(workdir, "results.csv"), rows, keys)
  plots = write_plots(workdir, rows, keys)
  extra: list[str] = []
  record = sweep_record(workdir)
  if record.get("ladder"):  # A scaling ladder: its fits follow the table.
    from jaxlm.sweep.ladder_report import summarize_ladder  # Imports jax and scipy.
    extra, ladder_plots = summarize_ladder(workdir, rows, record["ladder"])
    plots += ladder_plots
  _write_markdown(os.path.join(workdir, "results.md"), rows, keys,
                  [p for p in plots if not p.startswith("scaling_")], workdir, extra)
  logging.info("results of %d trials: %s, %s and %d plot(s) in %s", len(rows), "results.csv",
               "results.md", len(plots), workdir)
  return rows


def sweep_record(workdir: str) -> dict[str, Any]:
  """The workdir's sweep.json ({} for a workdir written before it existed)."""
  path = workdir_lib.path(workdir) / "sweep.json"
  return json.loads(workdir_lib.read_text(path)) if path.exists() else {}


def _atomic_write(path: str, text: str) -> None:
  workdir_lib.write_text(path, text)  # Several processes may summarise at once: last one wins.


def _write_csv(path: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
  import io
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["trial", *keys, *CSV_COLUMNS])
  for row in rows:
    w.writerow([row["trial"], *(row["overrides"].get(k, "") for k in keys),
                *("" if row[c] is None else row[c] for c in CSV_COLUMNS)])
  _atomic_write(path, buf.getvalue())


def _cell(value: Any, fmt: str = "") -> str:
  if value is None or value == "":
    return "-"
  text = format(value, fmt) if fmt else (short(value) if isinstance(value, float) else str(value))
  return text.replace("|", "\\|")


def _write_markdown(path: str, rows: list[dict[str, Any]], keys: list[str], plots: list[str],
                    workdir: str, extra: Sequence[str] = ()) -> None:
  from jaxlm import metrics  # For format_duration; imported lazily (it imports jax).
  counts = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  lines = [f"# Sweep results: {os.path.basename(os.path.normpath(workdir))}", "",
           f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}), "
           "finished trials first, sorted by final validation loss (lower is better).", "",
           "| # | " + " | ".join(f"`{k}`" for k in keys) +
           " | final val loss | best val loss | steps | tokens/s | wall time | status |",
           "|---" * (len(keys) + 7) + "|"]
  for i, row in enumerate(rows, 1):
    wall = row["wall_time_sec"]
    cells = [str(i), *(_cell(row["overrides"].get(k)) for k in keys),
             _cell(row["final_val_loss"], ".4f"), _cell(row["best_val_loss"], ".4f"),
             _cell(row["steps"]), _cell(row["tokens_per_sec"], ",.0f"),
             metrics.format_duration(wall) if wall is not None else "-", row["status"]]
    lines.append("| " + " | ".join(cells) + " |")
  failed = [row for row in rows if row["error"]]
  if failed:
    lines += ["", "Errors:", ""]
    lines += [f"- `{row['trial']}`: {row['error']}" for row in failed]
  if plots:
    lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  lines += extra
  _atomic_write(path, "\n".join(lines) + "\n")


def _by_step(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, one per step: a resumed run's repeated steps keep the last."""
  values = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
  steps = sorted(values)
  return steps, [values[s] for s in steps]


def _save(fig: Any, path: str) -> None:
  import io

  import matplotlib.pyplot as plt
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=110, format="png")
  workdir_lib.write_bytes(path, buf.getvalue())
  plt.close(fig)


def log_axis(values: Sequence[Any]) -> bool:
  """A log x axis for positive numbers spanning more than 10x."""
  numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
  return (len(numbers) == len(values) and bool(numbers) and min(numbers) > 0
          and max(numbers) / min(numbers) > 10)


def write_plots(workdir: str, rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
  """Final val loss vs each swept key, and every trial's loss curves; returns file names."""
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display needed.
  import matplotlib.pyplot as plt

  written = []
  scored = [r for r in rows if r["final_val_loss"] is not None and r["status"] in
            ("done", "pruned")]
  for key in keys:
    points = [r for r in scored if key in r["overrides"]]
    if not points:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [r["overrides"][key] for r in points]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    categories = sorted({str(v) for v in values})

    def x_of(v, numeric=numeric, categories=categories):
      return v if numeric else categories.index(str(v))

    # One line per combination of the other swept values: a product reads as a family.
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in points:
      label = ", ".join(f"{k}={short(v)}" for k, v in r["overrides"].items() if k != key)
      groups.setdefault(label, []).append(r)
    for label, members in sorted(groups.items()):
      members.sort(key=lambda r: x_of(r["overrides"][key]))
      xs = [x_of(r["overrides"][key]) for r in members]
      ys = [r["final_val_loss"] for r in members]
      line, = ax.plot(xs, ys, marker="o", label=label or None)
      pruned = [(x, y) for x, y, r in zip(xs, ys, members, strict=True) if r["status"] == "pruned"]
      if pruned:
        ax.plot(*zip(*pruned, strict=True), "x", color="gray", markersize=9,
                label="pruned" if label == sorted(groups)[0] else None)
    if log_axis(values):
      ax.set_xscale("log")
    if not numeric:
      ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(key)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"validation loss vs {key}")
    ax.grid(True, alpha=0.3)
    if len(groups) > 1 or any(r["status"] == "pruned" for r in points):
      ax.legend(fontsize=7)
    name = f"val_loss_vs_{key}.png"
    _save(fig, os.path.join(workdir, name))
    written.append(name)

  curves = [r for r in rows if any(METRIC in rec or "train/loss" in rec for rec in r["records"])]
  if curves:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(curves):
      color = f"C{i % 10}"
      steps, vals = _by_step(r["records"], METRIC)
      ax.plot(steps, vals, color=color, marker=".", label=f"{r['trial']} ({r['status']})")
      steps, losses = _by_step(r["records"], "train/loss")
      ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("validation loss (lines with dots) and training loss (faint)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, os.path.join(workdir, "loss_curves.png"))
    written.append("loss_curves.png")
  return written
