"""The summary of a scaling ladder: each trial's N, D and C, the fits, scaling.json and plots.

`summarize_ladder` is called by report.summarize when sweep.json holds a ladder. Per trial:
N from the trial's own config.json, counted as `jaxlm params` counts it (with embeddings, and
without: the token and position tables left out), D = the tokens it trained on (steps reached x
batch x block), C = D x jaxlm's FLOPs per token (metrics.flops_per_token: 6 N_matmul plus the
attention term), and its final validation loss. Only finished trials with a finite loss count.

Fits (jaxlm/sweep/scaling.py): L(N) = E + A / N^alpha at each budget (both counts of N); L(D)
= E + B / D^beta for each size trained at 3 or more budgets; for a flops= ladder, a parabola in
log N per FLOP budget whose minimum is that budget's compute-optimal N, then N_opt = k C^a.
A fit that cannot be made says why in one line, in results.md and scaling.json.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections
from absl import logging

from jaxlm import workdir as workdir_lib
from jaxlm.sweep import scaling
from jaxlm.sweep.ladders import size_counts
from jaxlm.sweep.overrides import short

N_KINDS = (("total", "with embeddings"), ("non_embedding", "without embeddings"))
EXTRAPOLATE = 10.0  # The plotted fit runs this far beyond the largest N (dashed there).


def _points(rows: list[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
  by_trial = {r["trial"]: r for r in rows}
  counts_of: dict[str, dict[str, Any]] = {}
  points = []
  for p in record["points"]:
    row = by_trial.get(p["trial"])
    loss = row and row["final_val_loss"]
    if not row or row["status"] != "done" or loss is None or not math.isfinite(loss):
      continue
    path = workdir_lib.path(row["dir"]) / "config.json"
    if not path.exists():
      continue
    cfg = ml_collections.ConfigDict(json.loads(workdir_lib.read_text(path)))
    key = json.dumps(cfg.model.to_dict(), sort_keys=True)
    if key not in counts_of:  # One model shape is counted once, whatever its budgets.
      counts_of[key] = size_counts(cfg, cfg.model.vocab_size)
    counts = counts_of[key]
    tokens = (row["steps"] or 0) * counts["tokens_per_step"]
    points.append({"trial": p["trial"], "size": p["size"], "budget": p["budget"],
                   "n_total": counts["total"], "n_non_embedding": counts["non_embedding"],
                   "tokens": tokens, "flops": tokens * counts["flops_per_token"],
                   "loss": float(loss)})
  return points


def _budget_label(kind: str | None, budget: Any) -> str:
  return "base steps" if kind is None else f"{short(budget)} {kind}"


def fit_ladder(points: list[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
  """Every fit the ladder allows, as JSON-ready dicts (with `skipped` where one is not made)."""
  kind, sizes = record["budget_kind"], list(record["sizes"])
  budgets = record["budgets"] or [None]
  fits = []
  if kind == "flops":
    frontier = []
    for b in budgets:
      at = [p for p in points if p["budget"] == b]
      fit, n_opt = scaling.fit_parabola([p["n_total"] for p in at], [p["loss"] for p in at])
      entry = {"law": "isoflop", "budget": b, "n": "total", **fit.as_dict()}
      if n_opt is not None:
        inside = min(p["n_total"] for p in at) <= n_opt <= max(p["n_total"] for p in at)
        entry.update(n_opt=n_opt, loss_opt=float(fit.predict([n_opt])[0]), inside=inside)
        frontier.append((b, n_opt))
      elif not fit.skipped:
        entry["skipped"] = "the losses curve downwards in log N: no optimum among these sizes"
      fits.append(entry)
    line = scaling.fit_line_loglog([c for c, _ in frontier], [n for _, n in frontier],
                                   "FLOP budgets with an optimum")
    fits.append({"law": "N_opt(C)", "n": "total", **line.as_dict()})
  else:
    for b in budgets:
      at = [p for p in points if p["budget"] == b]
      for n_key, _ in N_KINDS:
        fit = scaling.fit_power_law([p[f"n_{n_key}"] for p in at], [p["loss"] for p in at],
                                    f"sizes finished at {_budget_label(kind, b)}")
        fits.append({"law": "L(N)", "budget": b, "n": n_key, **fit.as_dict()})
        if fit.note == scaling.E_AT_BOUND:  # No floor in sight: the slope of a pure power law.
          line = scaling.fit_line_loglog([p[f"n_{n_key}"] for p in at], [p["loss"] for p in at])
          pure = line.as_dict()
          if "a" in pure:
            a, b_err = math.exp(pure.pop("b")), pure.pop("b_err")
            pure.update(alpha=-pure.pop("a"), alpha_err=pure.pop("a_err"), A=a,
                        A_err=None if b_err is None else a * b_err)  # d(e^b) = e^b db.
          fits.append({"law": "L(N), E = 0", "budget": b, "n": n_key, **pure})
  if kind is not None:
    for size in sizes:
      at = [p for p in points if p["size"] == size]
      if len(record["budgets"]) < 3:
        continue  # L(D) needs 3 budgets; not a fault of the ladder, so nothing to report.
      fit = scaling.fit_power_law([p["tokens"] for p in at], [p["loss"] for p in at],
                                  f"budgets finished by size {size}")
      fits.append({"law": "L(D)", "size": size, **fit.as_dict()})
  return fits


def _constants(f: dict[str, Any]) -> str:
  err = lambda n: f[f"{n}_err"] if f.get(f"{n}_err") is not None else math.inf
  text = ", ".join(f"{n} = {scaling.plus_minus(f[n], err(n))}"
                   for n in ("E", "A", "alpha", "a", "b", "c") if n in f)
  if f.get("skipped"):
    text = (text + "; " if text else "") + f"skipped: {f['skipped']}"
  if f.get("note"):
    text += f" ({f['note']})"
  return text


def _fit_of(f: dict[str, Any]) -> scaling.Fit:
  names = tuple(k for k in ("E", "A", "alpha", "a", "b", "c") if k in f)
  return scaling.Fit(f["kind"], names=names, values=tuple(f[k] for k in names),
                     errors=tuple(math.inf for _ in names), n_points=f["n_points"])


def _markdown(points: list[dict[str, Any]], fits: list[dict[str, Any]], record: dict[str, Any],
              plots: list[str]) -> list[str]:
  kind = record["budget_kind"]
  lines = ["", "## Scaling ladder", "",
           f"{len(record['sizes'])} sizes x {len(record['budgets']) or 1} budget(s) "
           f"({kind or 'the base config’s train.steps'}); {len(points)} finished trial(s) "
           "count. N (total) counts every parameter, as `jaxlm params` does; N (non-embedding) "
           "leaves out the token and position tables. D is tokens trained; C is D x FLOPs per "
           "token (6 N_matmul + attention, metrics.flops_per_token).", "",
           "| size | budget | N (total) | N (non-embedding) | D (tokens) | C (FLOPs) | "
           "final val loss |", "|---|---|---|---|---|---|---|"]
  for p in sorted(points, key=lambda p: (p["n_total"], p["tokens"])):
    lines.append(f"| {p['size']} | {_budget_label(kind, p['budget'])} | {p['n_total']:,} | "
                 f"{p['n_non_embedding']:,} | {p['tokens']:,} | {p['flops']:.3g} | "
                 f"{p['loss']:.4f} |")
  lines += ["", "| fit | of | points | constants (± one standard deviation) |",
            "|---|---|---|---|"]
  for f in fits:
    if f["law"].startswith("L(N)"):
      what = f"{_budget_label(kind, f['budget'])}, N {dict(N_KINDS)[f['n']]}"
      law = "L(N) = E + A / N^alpha" if f["law"] == "L(N)" else "L(N) = A / N^alpha (E = 0)"
    elif f["law"] == "L(D)":
      what, law = f"size {f['size']}", "L(D) = E + A / D^alpha"
    elif f["law"] == "isoflop":
      what = f"{f['budget']:.3g} FLOPs, N with embeddings"
      law = "L = a log²N + b log N + c"
      if "n_opt" in f:
        where = "" if f["inside"] else ", outside the sizes: extrapolated"
        law += f" (N_opt = {f['n_opt']:,.0f}, L = {f['loss_opt']:.4f}{where})"
    else:
      what, law = "FLOP budgets, N with embeddings", "N_opt = exp(b) C^a"
    lines.append(f"| {law} | {what} | {f['n_points']} | {_constants(f)} |")
  lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return lines


def _save(fig: Any, path: str) -> None:
  """As report's plots are saved (report imports this module, so not from there)."""
  import io

  import matplotlib.pyplot as plt
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=110, format="png")
  workdir_lib.write_bytes(path, buf.getvalue())
  plt.close(fig)


def _loss_axis(ax: Any) -> None:
  """A log loss axis labelled in plain numbers (a ladder spans a fraction of a decade)."""
  from matplotlib.ticker import FormatStrFormatter
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
  ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))


def _plots(workdir: str, points: list[dict[str, Any]], fits: list[dict[str, Any]],
           record: dict[str, Any]) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  if not points:
    return []
  kind, written = record["budget_kind"], []
  budgets = record["budgets"] or [None]
  if kind != "flops":
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (n_key, label) in zip(axes, N_KINDS, strict=True):
      for i, b in enumerate(budgets):
        at = sorted((p for p in points if p["budget"] == b), key=lambda p: p[f"n_{n_key}"])
        xs, ys = [p[f"n_{n_key}"] for p in at], [p["loss"] for p in at]
        ax.plot(xs, ys, "o", color=f"C{i}", label=_budget_label(kind, b))
        f = next(f for f in fits if f["law"] == "L(N)" and f["budget"] == b and f["n"] == n_key)
        if "alpha" in f and xs:
          fit = _fit_of(f)
          inside = np.geomspace(min(xs), max(xs), 50)
          beyond = np.geomspace(max(xs), max(xs) * EXTRAPOLATE, 20)
          ax.plot(inside, fit.predict(inside), "-", color=f"C{i}",
                  label=f"E + A/N^α, α = {f['alpha']:.3g}, E = {f['E']:.3g}")
          ax.plot(beyond, fit.predict(beyond), "--", color=f"C{i}", alpha=0.7)
      ax.set_xscale("log")
      _loss_axis(ax)
      ax.set_xlabel(f"N, parameters {label}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=7)
    axes[0].set_ylabel("final validation loss")
    fig.suptitle("scaling ladder: loss vs parameters (dashed: extrapolation)")
    _save(fig, os.path.join(workdir, "scaling_loss_vs_n.png"))
    written.append("scaling_loss_vs_n.png")
  else:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, b in enumerate(budgets):
      at = sorted((p for p in points if p["budget"] == b), key=lambda p: p["n_total"])
      xs = [p["n_total"] for p in at]
      ax.plot(xs, [p["loss"] for p in at], "o", color=f"C{i}", label=f"{b:.3g} FLOPs")
      f = next(f for f in fits if f["law"] == "isoflop" and f["budget"] == b)
      if "a" in f and xs:
        grid = np.geomspace(min(xs), max(xs), 50)
        ax.plot(grid, _fit_of(f).predict(grid), "-", color=f"C{i}")
        if "n_opt" in f:
          ax.plot([f["n_opt"]], [f["loss_opt"]], "*", color=f"C{i}", markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("N, parameters with embeddings")
    ax.set_ylabel("final validation loss")
    ax.set_title("IsoFLOP profiles (stars: optimum)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    opt = [f for f in fits if f["law"] == "isoflop" and "n_opt" in f]
    ax2.plot([f["budget"] for f in opt], [f["n_opt"] for f in opt], "*", markersize=12)
    line = next(f for f in fits if f["law"] == "N_opt(C)")
    if "a" in line:
      cs = np.geomspace(min(f["budget"] for f in opt), max(f["budget"] for f in opt)
                        * EXTRAPOLATE, 50)
      ax2.plot(cs, _fit_of(line).predict(cs), "--", label=f"N_opt ∝ C^{line['a']:.3g}")
      ax2.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("C, training FLOPs")
    ax2.set_ylabel("compute-optimal N")
    ax2.set_title("compute-optimal frontier")
    ax2.grid(True, which="both", alpha=0.3)
    _save(fig, os.path.join(workdir, "scaling_isoflop.png"))
    written.append("scaling_isoflop.png")
  by_d = [f for f in fits if f["law"] == "L(D)" and "alpha" in f]
  if by_d:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, f in enumerate(by_d):
      at = sorted((p for p in points if p["size"] == f["size"]), key=lambda p: p["tokens"])
      xs = [p["tokens"] for p in at]
      ax.plot(xs, [p["loss"] for p in at], "o", color=f"C{i}")
      grid = np.geomspace(min(xs), max(xs) * EXTRAPOLATE, 50)
      ax.plot(grid, _fit_of(f).predict(grid), "--", color=f"C{i}",
              label=f"{f['size']}: α = {f['alpha']:.3g}")
    ax.set_xscale("log")
    _loss_axis(ax)
    ax.set_xlabel("D, tokens trained")
    ax.set_ylabel("final validation loss")
    ax.set_title("loss vs tokens per size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, os.path.join(workdir, "scaling_loss_vs_d.png"))
    written.append("scaling_loss_vs_d.png")
  return written


def summarize_ladder(workdir: str, rows: list[dict[str, Any]],
                     record: dict[str, Any]) -> tuple[list[str], list[str]]:
  """Writes scaling.json and the ladder's plots; returns (results.md lines, plot names)."""
  points = _points(rows, record)
  fits = fit_ladder(points, record)
  plots = _plots(workdir, points, fits, record)
  workdir_lib.write_text(os.path.join(workdir, "scaling.json"), json.dumps(
      {"budget_kind": record["budget_kind"], "points": points, "fits": fits}, indent=2))
  for f in fits:
    if f.get("skipped"):
      logging.warning("scaling fit %s skipped: %s", f["law"], f["skipped"])
  return _markdown(points, fits, record, plots), plots
