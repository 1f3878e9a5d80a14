"""`jaxlm params`: a config's parameters, FLOPs, memory and step-time estimate (nothing is
allocated), or, for a trained run, how far each tensor moved from its random init."""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from jaxlm.cli import common
from jaxlm.errors import JaxlmError

USAGE = """\
usage: jaxlm params --config FILE [--device NAME] [--num_devices N] [--peak_tflops X]
           [--device_memory_gb X] [--mfu X] [--plot_lr FILE.png] [--format text|json]
           [--config.KEY=VALUE ...]
       jaxlm params --workdir DIR [--step N|latest|best] [--plot FILE.png] [--format text|json]

What the parameters are, what they cost and whether a config fits a device, e.g.
  jaxlm params --config configs/gpt2_small.py --device "TPU v4"
and the learning rate of each optimizer group over train.steps:
  jaxlm params --config configs/shakespeare_char.py --plot_lr lr.png
and, for a trained run, how far each tensor moved from its random init:
  jaxlm params --workdir runs/sc --plot drift.png
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_CONFIG = common.define_config(FLAGS)
_WORKDIR = common.define_workdir(FLAGS)
_STEP = common.define_step(FLAGS)
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "params: report format.",
                            flag_values=FLAGS)
_DEVICE = flags.DEFINE_string(
    "device", None, "params: target device by name, e.g. 'TPU v4' or 'NVIDIA A100-SXM4-80GB' "
    "(sets --peak_tflops and --device_memory_gb unless they are given).", flag_values=FLAGS)
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "params: peak TFLOP/s of one device, for the step-time estimate.",
    flag_values=FLAGS)
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    "device_memory_gb", None, "params: memory of one device in GiB; warns if the run won't fit.",
    flag_values=FLAGS)
_MFU = flags.DEFINE_float("mfu", 0.4, "params: model FLOPs utilisation assumed for step time.",
                          flag_values=FLAGS)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "params: devices of the target (default: this machine's).",
    flag_values=FLAGS)
_PLOT = flags.DEFINE_string("plot", None, "params --workdir: write a PNG of drift per layer.",
                            flag_values=FLAGS)
_PLOT_LR = flags.DEFINE_string(
    "plot_lr", None, "params --config: write a PNG of the learning rate schedule of each "
    "optimizer group (lr x lr_mult) over train.steps.", flag_values=FLAGS)


def main(argv: list[str]) -> None:
  del argv
  if (_CONFIG.value is None) == (_WORKDIR.value is None):
    raise JaxlmError("give --config (a config's parameters) or --workdir (a trained run's)")
  import json

  from jaxlm import params
  if _WORKDIR.value is not None:
    if _PLOT_LR.value:
      raise JaxlmError("--plot_lr needs --config (it draws a config's schedule)")
    report = params.run_report(_WORKDIR.value, step=common.parse_step(_STEP.value))
    if _PLOT.value:
      params.plot_drift(report, _PLOT.value)
    text = params.format_run_text(report)
  else:
    if _STEP.value is not None or _PLOT.value:
      raise JaxlmError("--step and --plot need --workdir (a trained run)")
    cfg = _CONFIG.value
    import jax
    report = params.config_report(
        _CONFIG.value, config_path=config_flags.get_config_filename(FLAGS["config"]),
        n_devices=_NUM_DEVICES.value or jax.device_count(), device=_DEVICE.value or "",
        peak_tflops=_PEAK_TFLOPS.value or 0.0, device_memory_gib=_DEVICE_MEMORY_GB.value or 0.0,
        mfu=_MFU.value)
    text = params.format_config_text(report)
    if _PLOT_LR.value:
      from jaxlm import optim
      curves = optim.lr_curves(cfg.optim, cfg.train.steps,
                               [(g["name"], g["optimizer"], g["lr_mult"])
                                for g in report["optimizer_groups"]])
      params.plot_lr(curves, _PLOT_LR.value,
                     f"{report['config'] or 'config'}: optim.schedule={cfg.optim.schedule}, "
                     f"{cfg.train.steps:,} steps")
  for warning in report["warnings"]:
    logging.warning("%s", warning)
  sys.stdout.write(json.dumps(report, indent=2) + "\n" if _FORMAT.value == "json" else text)
