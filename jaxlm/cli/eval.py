"""`jaxlm eval`: evaluate one checkpoint of a trained run on its validation data."""

from __future__ import annotations

from absl import flags

from jaxlm.cli import common

USAGE = """\
usage: jaxlm eval --workdir DIR [--step N|latest|best] [--eval_steps N]

Evaluates a checkpoint of the run in --workdir and prints its validation loss, perplexity and
bits per token, e.g.
  jaxlm eval --workdir runs/sc --step best
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_WORKDIR = common.define_workdir(FLAGS)
_STEP = common.define_step(FLAGS)
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "Batches to evaluate (default: the run's "
                                   "train.eval_steps).", flag_values=FLAGS)


def main(argv: list[str]) -> None:
  del argv
  common.require(_WORKDIR.value, "workdir")
  from jaxlm import runs
  result = runs.evaluate_run(_WORKDIR.value, step=common.parse_step(_STEP.value),
                             eval_steps=_EVAL_STEPS.value)
  per_source = "".join(f" | {k[4:-5]} loss {v:.4f}, bpb {result[k[:-4] + 'bpb']:.4f}"
                       for k, v in result.items()
                       if k.count("/") == 2 and k.endswith("/loss") and k[:-4] + "bpb" in result)
  bpb = f" | val bits/byte {result['val/bpb']:.4f}" if "val/bpb" in result else ""
  print(f"step {result['step']} | val loss {result['val/loss']:.4f} | val perplexity "
        f"{result['val/perplexity']:.3f} | val bits/token {result['val/bits_per_token']:.4f}"
        f"{bpb} | {result['tokens']:,} tokens{per_source}")
