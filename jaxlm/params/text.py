"""The reports as text for a terminal, and the drift plot."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxlm import metrics
from jaxlm.errors import JaxlmError
from jaxlm.params import anatomy, cost


def format_bytes(n: float) -> str:
  for unit, size in (("GiB", cost.GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def format_seconds(seconds: float) -> str:
  if seconds < 1e-3:
    return f"{1e6 * seconds:.3g} µs"
  if seconds < 1.0:
    return f"{1e3 * seconds:.3g} ms"
  return f"{seconds:.3g} s" if seconds < 60 else metrics.format_duration(seconds)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]], right: set[int]) -> list[str]:
  cells = [tuple(str(c) for c in row) for row in [header, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for row in cells:
    padded = [c.rjust(w) if i in right else c.ljust(w)
              for i, (c, w) in enumerate(zip(row, widths, strict=True))]
    lines.append(("  " + "  ".join(padded)).rstrip())
  return lines


def format_config_text(report: dict[str, Any]) -> str:
  """The human-readable form of `config_report`."""
  p, mem, comp = report["params"], report["memory"], report["compute"]
  hp = report["hyperparameters"]
  total = p["total"]
  out = [f"jaxlm params {report['config'] or '(config)'}: {total:,} parameters, "
         f"{hp['model.n_layer']} layers x d_model {hp['model.d_model']}, "
         f"{hp['model.n_head']} heads, block {hp['model.block_size']}, vocab "
         f"{hp['model.vocab_size']}", ""]

  out.append("Hyperparameters: chosen by a person; these fix every number below")
  notes = {"model.vocab_size": report["vocab_source"], "model.d_ff": "resolved",
           "model.n_kv_head": "resolved"}
  out += _table(("name", "value", ""), [(k, v, notes.get(k, "")) for k, v in hp.items()],
                right=set())
  out.append("")

  out.append("Parameters: learned; they start random and training moves them "
             f"({len(report['tensors'])} tensors)")
  out += _table(
      ("path", "shape", "dtype", "count", "kind", "logical axes", "group"),
      [(t["path"], " x ".join(map(str, t["shape"])), t["dtype"], f"{t['count']:,}", t["kind"],
        ", ".join(str(a) for a in t["logical_axes"]) if t["logical_axes"] else "-", t["group"])
       for t in report["tensors"]], right={3})
  out.append("")

  if report.get("mup"):
    out.append(f"{report['mup']}; per tensor (relative to sp at this width):")
    out += _table(("path", "μP role", "init std x", "lr x"),
                  [(t["path"], t["mup"]["role"], f"{t['mup']['init_mult']:.4g}",
                    f"{t['mup']['lr_mult']:.4g}") for t in report["tensors"]], right={2, 3})
    out.append("")

  out.append("Optimizer groups: each trains its tensors (the group column above) on the shared "
             "schedule times lr_mult")
  out += _table(("group", "optimizer", "lr_mult", "weight decay", "tensors", "params"),
                [(g["name"], g["optimizer"], f"{g['lr_mult']:g}", g["weight_decay"],
                  g["tensors"], f"{g['params']:,}") for g in report["optimizer_groups"]],
                right={2, 4, 5})
  out.append("")

  out.append("By kind")
  rows = [(k, f"{v:,}", f"{100 * v / total:.2f}%", f"{p['formula_by_kind'].get(k, 0):,}")
          for k, v in p["by_kind"].items()]
  rows.append(("total", f"{total:,}", "100.00%", f"{p['formula_total']:,}"))
  out += _table(("kind", "count", "share", "formula"), rows, right={1, 2, 3})
  match = "matches" if p["formula_total"] == total else "DOES NOT MATCH"
  out.append(f"  analytic formula {match} the model: {p['formula']}")
  out.append("")

  out.append(f"By layer (formula per block: {p['formula_per_block']:,})")
  out += _table(("layer", "count", "share"),
                [(k, f"{v:,}", f"{100 * v / total:.2f}%") for k, v in p["by_layer"].items()],
                right={1, 2})
  out.append("")

  b = mem["bytes"]
  mesh = " ".join(f"{k}={v}" for k, v in mem["mesh"].items())
  out.append(f"Memory on {mem['devices']} device(s), mesh {mesh}, rules {mem['rules']}, "
             f"{mem['batch_per_device']} sequence(s) of {hp['model.block_size']} tokens per "
             "device per microbatch")
  out += _table(
      ("", "total", "per device"),
      [(f"params ({hp['model.param_dtype']})", format_bytes(b["params"]["total"]),
        format_bytes(b["params"]["per_device"])),
       (f"optimizer state ({mem['optimizer']}: {mem['optimizer_state_per_param']:g} x params)",
        format_bytes(b["optimizer_state"]["total"]),
        format_bytes(b["optimizer_state"]["per_device"])),
       ("gradients", format_bytes(b["gradients"]["total"]),
        format_bytes(b["gradients"]["per_device"])),
       (f"activations (estimate, remat {mem['remat']})", format_bytes(b["activations"]["total"]),
        format_bytes(b["activations"]["per_device"])),
       ("total", "", format_bytes(b["total"]["per_device"]))], right={1, 2})
  out.append(f"  activations: {mem['activation_bytes_per_token']:,.0f} bytes per token kept for "
             "the backward pass (the formula is in params.activation_bytes_per_token); their "
             "total is one whole microbatch on one device")
  if mem["device_memory_gib"]:
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    out.append(f"  device memory {mem['device_memory_gib']:g} GiB: {verdict}")
  out.append("")

  out.append("Compute")
  attention = f"{hp['model.n_layer']}·{hp['model.d_model']}·{hp['model.block_size']}"
  if comp["attended_keys"] != hp["model.n_layer"] * hp["model.block_size"]:
    # Sliding windows: the keys of each layer, summed (metrics.attended_keys).
    attention = f"{hp['model.d_model']}·{comp['attended_keys']}"
  out.append(f"  FLOPs per token  {comp['flops_per_token']:.4g} = 6·{p['matmul']:,} + "
             f"12·{attention}")
  out.append(f"                   convention: {comp['convention']}")
  out.append(f"  tokens per step  {comp['tokens_per_step']:,} (train.batch_size "
             f"{hp['train.batch_size']} x block_size {hp['model.block_size']})")
  out.append(f"  FLOPs per step   {comp['flops_per_step']:.4g}")
  if comp["step_time_sec"] is not None:
    on = f" ({comp['device']})" if comp["device"] else ""
    out.append(f"  step time        {format_seconds(comp['step_time_sec'])} at MFU "
               f"{100 * comp['mfu']:g}% on {mem['devices']} device(s) of "
               f"{comp['peak_tflops_per_device']:g} TFLOP/s{on}; train.steps "
               f"{hp['train.steps']:,} take {format_seconds(comp['train_time_sec'])}")
  else:
    out.append("  step time        give --device or --peak_tflops for an estimate")
  out.append("")

  out.append("Other hyperparameters: chosen by a person; they steer training but change none "
             "of the numbers above")
  out += _table(("name", "value"), list(report["other_hyperparameters"].items()), right=set())
  for w in report["warnings"]:
    out += ["", f"WARNING: {w}"]
  return "\n".join(out) + "\n"


def _opt(x: float | None, spec: str = ".3g") -> str:
  return "-" if x is None else format(x, spec)


def format_run_text(report: dict[str, Any]) -> str:
  """The human-readable form of `run_report`."""
  out = [f"jaxlm params {report['workdir']} at step {report['step']}: {report['total']:,} "
         f"parameters; drift = ‖θ − θ₀‖ / ‖θ₀‖ from the init of seed {report['seed']} "
         "(- where θ₀ = 0: compare those by Δrms = ‖θ − θ₀‖ / √count)", ""]
  out += _table(
      ("path", "shape", "kind", "rms", "mean", "std", "drift", "Δrms"),
      [(t["path"], " x ".join(map(str, t["shape"])), t["kind"], _opt(t["rms"]),
        _opt(t["mean"]), _opt(t["std"]), _opt(t["drift"]), _opt(t["delta_rms"]))
       for t in report["tensors"]], right={3, 4, 5, 6, 7})
  for title, key in (("By layer", "by_layer"), ("By kind", "by_kind")):
    out += ["", title]
    out += _table(("", "count", "norm", "init norm", "drift", "Δrms"),
                  [(name, f"{g['count']:,}", _opt(g["norm"]), _opt(g["init_norm"]),
                    _opt(g["drift"]), _opt(g["delta_rms"]))
                   for name, g in report[key].items()], right={1, 2, 3, 4, 5})
  g = report["global"]
  out += ["", f"All parameters: drift {_opt(g['drift'])}, Δrms {_opt(g['delta_rms'])}",
          f"Most changed (by Δrms): {', '.join(report['most_changed'])}"]
  for w in report["warnings"]:
    out += ["", f"WARNING: {w}"]
  return "\n".join(out) + "\n"


def plot_drift(report: dict[str, Any], path: str) -> None:
  """PNG of drift per layer: relative drift (left), Δrms per layer and kind (right)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = list(report["by_layer"])
  x = np.arange(len(layers))
  fig, (ax_drift, ax_rms) = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(layers) + 6), 4))
  ax_drift.bar(x, [report["by_layer"][n]["drift"] or 0.0 for n in layers])
  ax_drift.set_ylabel("‖θ − θ₀‖ / ‖θ₀‖")
  ax_drift.set_title(f"drift from init per layer, step {report['step']}")
  kinds = [k for k in anatomy.KINDS if any(t["kind"] == k for t in report["tensors"])]
  width = 0.8 / max(len(kinds), 1)
  for i, kind in enumerate(kinds):
    sq = {n: [0.0, 0] for n in layers}
    for t in report["tensors"]:
      if t["kind"] == kind:
        sq[t["layer"]][0] += t["delta_rms"] ** 2 * t["count"]
        sq[t["layer"]][1] += t["count"]
    ax_rms.bar(x + (i - (len(kinds) - 1) / 2) * width,
               [math.sqrt(s / c) if c else 0.0 for s, c in sq.values()], width, label=kind)
  ax_rms.set_ylabel("‖θ − θ₀‖ / √count")
  ax_rms.set_title("change per parameter, by kind")
  ax_rms.legend()
  for ax in (ax_drift, ax_rms):
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=60, ha="right")
  save_figure(fig, path)


def plot_lr(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str) -> None:
  """PNG of the learning rate over training: one line per group, {name: (steps, lr)}."""
  try:
    import matplotlib
  except ImportError:
    raise JaxlmError("--plot_lr needs matplotlib: pip install matplotlib") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4))
  for name, (steps, lr) in curves.items():
    ax.plot(steps, lr, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("learning rate (lr x lr_mult)")
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  save_figure(fig, path)


def save_figure(fig, path: str) -> None:
  """Writes a figure as PNG and closes it; an unwritable path is a one-line error."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  try:
    fig.savefig(path, dpi=120)
  except OSError as e:
    raise JaxlmError(f"cannot write the plot {path!r}: {e.strerror}") from None
  finally:
    plt.close(fig)
