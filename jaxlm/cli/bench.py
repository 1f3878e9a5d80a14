"""`jaxlm bench`: time a config's train step (tokens/s, MFU) and its sampling, without a run."""

from __future__ import annotations

from absl import flags

from jaxlm.cli import common

USAGE = """\
usage: jaxlm bench --config FILE [--steps N] [--profile DIR] [--json_out FILE] [--nosampling]
           [--config.KEY=VALUE ...]

Times the train step of a config (tokens/s and MFU after warm-up) and sampling (prefill and
decode), and prints a report and its JSON, e.g.
  jaxlm bench --config configs/shakespeare_char.py --steps 20
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_CONFIG = common.define_config(FLAGS)
_BENCH_STEPS = flags.DEFINE_integer("steps", 20, "bench: timed steps after warm-up.",
                                    flag_values=FLAGS)
_JSON_OUT = flags.DEFINE_string("json_out", None, "bench: also write the report to this file.",
                                flag_values=FLAGS)
_PROFILE = flags.DEFINE_string("profile", None, "bench: trace a few steps with the JAX profiler "
                               "into this directory and list the ops that take the time.",
                               flag_values=FLAGS)
_SAMPLING = flags.DEFINE_bool("sampling", True, "bench: also time sampling (prefill, decode).",
                              flag_values=FLAGS)


def main(argv: list[str]) -> None:
  del argv
  from jaxlm import phases
  clock = phases.Phases(start=phases.process_start())  # From jaxlm's first import on.
  common.require(_CONFIG.value, "config")
  import json

  from jaxlm import host
  # No persistent compile cache: the report's compile_s would time a cache hit, not XLA.
  host.prepare_process(_CONFIG.value, compile_cache=False)
  from jaxlm import bench, workdir
  if _PROFILE.value:
    workdir.prepare(_PROFILE.value)  # A directory that cannot be made is one line, up front.
  report = bench.bench_train(_CONFIG.value, steps=_BENCH_STEPS.value,
                             profile_dir=_PROFILE.value, sampling=_SAMPLING.value,
                             phases=clock)
  print(bench.format_report(report))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  print(json.dumps(report))
