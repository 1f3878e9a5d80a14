"""`jaxlm eval`: evaluate one checkpoint of a trained run on its validation data."""

from __future__ import annotations

from absl import flags

from jaxlm.cli import common

USAGE = """\
usage: jaxlm eval --workdir DIR [--step N|latest|best] [--eval_steps N] [--tasks T1,T2]
                  [--noval] [--truncation left|error]

Evaluates a checkpoint of the run in --workdir: its validation loss, perplexity and bits per
token and per byte (per source too, for data.sources runs), and the downstream tasks given
(shipped names or task files), as a table; everything also goes to DIR/eval/<step>.json, e.g.
  jaxlm eval --workdir runs/sc --step best
  jaxlm eval --workdir runs/sc --tasks shakespeare_next_line,shakespeare_last_word --noval
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_WORKDIR = common.define_workdir(FLAGS)
_STEP = common.define_step(FLAGS)
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "Batches to evaluate (default: the run's "
                                   "train.eval_steps).", flag_values=FLAGS)
_TASKS = flags.DEFINE_string("tasks", "", "Comma-separated tasks: shipped names (e.g. "
                             "shakespeare_next_line) or task files (.yaml/.json).",
                             flag_values=FLAGS)
_VAL = flags.DEFINE_boolean("val", True, "Evaluate the validation loss too.", flag_values=FLAGS)
_TRUNCATION = flags.DEFINE_string("truncation", "", "A task example longer than the block "
                                  "size: left (keep its end) or error; default: the run's "
                                  "train.eval_tasks_truncation.", flag_values=FLAGS)


def main(argv: list[str]) -> None:
  del argv
  common.require(_WORKDIR.value, "workdir")
  from jaxlm import runs
  from jaxlm.tasks import task as task_lib
  result = runs.evaluate_run(_WORKDIR.value, step=common.parse_step(_STEP.value),
                             eval_steps=_EVAL_STEPS.value,
                             tasks=task_lib.parse_list(_TASKS.value), val=_VAL.value,
                             truncation=_TRUNCATION.value)
  print(f"step {result['step']} of {_WORKDIR.value}")
  rows = [(k, f"{v:.4f}") for k, v in result.items()
          if k.startswith("val/") and k.rsplit("/", 1)[1] in ("loss", "perplexity", "bpb",
                                                               "bits_per_token")]
  if rows:
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"({result['tokens']:,} tokens)")
  tasks = result.get("tasks", {})
  if tasks:
    width = max(len(n) for n in tasks)
    cols = ("acc", "acc_norm", "chance", "logprob", "bpb")
    shown = [c for c in cols if any(c in r for r in tasks.values())]
    print(f"{'task':<{width}}  " + "  ".join(f"{c:>9}" for c in shown) + "  examples/s")
    for name, r in tasks.items():
      print(f"{name:<{width}}  " + "  ".join(
          f"{r[c]:>9.4f}" if c in r else f"{'':>9}" for c in shown) +
          f"  {r['examples_per_sec']:>10.1f}")
    if "tasks/core" in result:
      print(f"{'core':<{width}}  {result['tasks/core']:>9.4f}")
  print(f"written to {_WORKDIR.value.rstrip('/')}/eval/{result['step']}.json")
