"""Scoring speed: jaxlm's built-in task scorer vs the lm-eval backend, on the same task and run.

  PYTHONPATH=. python experiments/eval_speed/run.py --workdir runs/sc [--task shakespeare_next_line]
      [--batch_size 32] [--repeats 3]

The built-in path is jaxlm.tasks.task.evaluate over a shipped task file; the lm-eval path is
lm_eval.simple_evaluate with the "jaxlm" model (jaxlm.tasks.harness) over an lm-eval YAML
that reads the same JSONL. Both score with a Scorer of their own (the same code, batch size
and devices), so the difference is lm-eval's own work: loading the dataset, rendering
prompts, building and sorting requests, metrics. Each path runs `repeats` times; the first
includes compilation, the fastest of the rest is reported as warm.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import lm_eval  # noqa: E402
import lm_eval.tasks  # noqa: E402

from jaxlm.tasks import harness  # noqa: E402
from jaxlm.tasks import scorer as scorer_lib  # noqa: E402
from jaxlm.tasks import task as task_lib  # noqa: E402


def lm_eval_yaml(task: task_lib.Task, directory: str) -> str:
  """An lm-eval task over the jaxlm task's JSONL, with the same fields and delimiter."""
  if task.type != "multiple_choice" or task.num_fewshot:
    raise SystemExit("this comparison covers zero-shot multiple-choice tasks")
  name = f"lm_eval_{task.name}"
  spec = {"task": name, "dataset_path": "json",
          "dataset_kwargs": {"data_files": {"test": os.path.abspath(task.data)},
                             "cache_dir": os.path.join(directory, "datasets")},
          "test_split": "test", "output_type": "multiple_choice",
          "doc_to_text": "{{" + task.context_field + "}}",
          "doc_to_choice": "{{" + task.choices_field + "}}",
          "doc_to_target": task.label_field, "target_delimiter": task.target_delimiter,
          "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
  with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
    json.dump(spec, f, indent=1)
  return name


def timed(fn, scorer: scorer_lib.Scorer, repeats: int) -> tuple[float, float, float, dict]:
  """(first run s, fastest later run s, scorer s within that run, last result)."""
  runs, result = [], None
  for _ in range(repeats):
    t0, s0 = time.perf_counter(), scorer.seconds
    result = fn()
    runs.append((time.perf_counter() - t0, scorer.seconds - s0))
  warm = min(runs[1:])
  return runs[0][0], warm[0], warm[1], result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained run, e.g. runs/sc from "
                      "`jaxlm train --config configs/shakespeare_char.py --workdir runs/sc`")
  parser.add_argument("--step", default="best")
  parser.add_argument("--task", default="shakespeare_next_line")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  if args.repeats < 2:
    raise SystemExit("--repeats must be >= 2 (the first run compiles)")

  task = task_lib.load(args.task)
  n = len(task.examples)
  # The backend loads the run once; the built-in path gets its own Scorer on the same params.
  lm = harness.JaxlmLM(workdir=args.workdir, step=args.step, batch_size=args.batch_size)
  built_in_scorer = scorer_lib.Scorer(lm.run.model, lm.run.params, lm.tokenizer,
                                      batch_size=lm.batch_size, place=lm.place)
  with tempfile.TemporaryDirectory() as tmp:
    name = lm_eval_yaml(task, tmp)
    manager = lm_eval.tasks.TaskManager(include_path=tmp)
    b_first, b_warm, b_scorer, b_result = timed(
        lambda: task_lib.evaluate(task, built_in_scorer), built_in_scorer, args.repeats)
    l_first, l_warm, l_scorer, l_result = timed(
        lambda: lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager,
                                        bootstrap_iters=0), lm.scorer, args.repeats)
  l_acc = l_result["results"][name]["acc,none"]
  print(f"run {args.workdir} (step {lm.run.step}), task {args.task}: {n} examples, "
        f"{sum(len(ex[task.choices_field]) for ex in task.examples)} requests, "
        f"batch {lm.batch_size}, {jax.device_count()} {jax.devices()[0].platform} device(s)")
  print("| path | first run s | warm s | of which scoring s | warm examples/s | acc |")
  print("|---|---:|---:|---:|---:|---:|")
  print(f"| built-in scorer (jaxlm.tasks.task.evaluate) | {b_first:.2f} | {b_warm:.2f} | "
        f"{b_scorer:.2f} | {n / b_warm:.0f} | {b_result['acc']:.4f} |")
  print(f"| lm-eval backend (simple_evaluate, model jaxlm) | {l_first:.2f} | {l_warm:.2f} | "
        f"{l_scorer:.2f} | {n / l_warm:.0f} | {l_acc:.4f} |")


if __name__ == "__main__":
  main()
