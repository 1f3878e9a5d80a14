"""Downstream tasks as small files: what to read, how to score it, and the metrics.

A task is a YAML or JSON file (or the name of one shipped in jaxlm/tasks/data/):

    name: shakespeare_next_line          # metric prefix: tasks/<name>/acc ...
    type: multiple_choice                # multiple_choice | cloze | rolling
    data: shakespeare_next_line.jsonl    # JSON Lines, relative to this file (or absolute)
    context_field: context               # multiple_choice and cloze
    choices_field: choices               # multiple_choice: a list of strings
    label_field: label                   # multiple_choice: index of the right choice
    target_field: target                 # cloze: the continuation to produce
    text_field: text                     # rolling: the document
    target_delimiter: " "                # between context and continuation (lm-eval's " ")
    num_fewshot: 0                       # solved examples before each context...
    fewshot_delimiter: "\n\n"            # ...separated by this, drawn with
    fewshot_seed: 1234                   # this seed from the other examples
    limit: 0                             # first N examples only; 0 = all

Metrics, as lm-evaluation-harness defines them:
  multiple_choice  acc (the choice of highest log-likelihood is the label), acc_norm (the same
                   with log-likelihood divided by the choice's length in characters),
                   chance (1 / number of choices, for the CORE aggregate)
  cloze            acc (the target is the model's greedy continuation, LAMBADA's accuracy),
                   logprob (mean log-likelihood of the target), chance 0
  rolling          logprob per document, bpb (bits per UTF-8 byte), word_perplexity
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
from typing import Any

import numpy as np
import yaml

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError
from jaxlm.tasks import scorer as scorer_lib

TYPES = ("multiple_choice", "cloze", "rolling")
KEYS = ("name", "type", "data", "context_field", "choices_field", "label_field", "target_field",
        "text_field", "target_delimiter", "num_fewshot", "fewshot_delimiter", "fewshot_seed",
        "limit")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  type: str
  data: str  # Resolved path of the JSONL.
  examples: tuple[dict[str, Any], ...]
  context_field: str = "context"
  choices_field: str = "choices"
  label_field: str = "label"
  target_field: str = "target"
  text_field: str = "text"
  target_delimiter: str = " "
  num_fewshot: int = 0
  fewshot_delimiter: str = "\n\n"
  fewshot_seed: int = 1234


def shipped() -> dict[str, str]:
  """Name -> path of the task files shipped with jaxlm."""
  root = importlib.resources.files("jaxlm") / "tasks" / "data"
  return {p.name.rsplit(".", 1)[0]: str(p) for p in root.iterdir()
          if p.name.endswith((".yaml", ".yml"))}


def parse_list(text: str) -> list[str]:
  """train.eval_tasks / --tasks: comma-separated names or paths."""
  return [t.strip() for t in text.split(",") if t.strip()]


def load(name_or_path: str) -> Task:
  """A task by shipped name or file path; one-line errors for every problem in it."""
  path = shipped().get(name_or_path)
  if path is None:
    if not name_or_path.endswith((".yaml", ".yml", ".json")):
      raise JaxlmError(f"unknown task {name_or_path!r}: the shipped tasks are "
                       f"{', '.join(sorted(shipped()))}; or give a task file (.yaml/.json)")
    path = os.path.expanduser(name_or_path)
  try:
    spec = yaml.safe_load(workdir_lib.read_text(path))
  except FileNotFoundError:
    raise JaxlmError(f"task file not found: {path}") from None
  except yaml.YAMLError as e:
    raise JaxlmError(f"task file {path} is not YAML or JSON: {str(e).splitlines()[0]}") from None
  if not isinstance(spec, dict):
    raise JaxlmError(f"task file {path} must be a mapping of {', '.join(KEYS[:3])}, ...")
  unknown = sorted(set(spec) - set(KEYS))
  if unknown:
    raise JaxlmError(f"task file {path}: unknown key {unknown[0]!r}; a task has "
                     f"{', '.join(KEYS)}")
  for key in ("name", "type", "data"):
    if not spec.get(key):
      raise JaxlmError(f"task file {path}: {key!r} is missing")
  if spec["type"] not in TYPES:
    raise JaxlmError(f"task file {path}: type={spec['type']!r}; expected {', '.join(TYPES)}")
  data = spec["data"]
  if not workdir_lib.is_remote(data) and not os.path.isabs(os.path.expanduser(data)):
    data = os.path.join(os.path.dirname(path), data)
  fields = {k: spec[k] for k in KEYS if k in spec and k not in ("name", "type", "data",
                                                                   "limit")}
  task = Task(name=str(spec["name"]), type=spec["type"], data=data, examples=(), **fields)
  examples = _read_examples(task, int(spec.get("limit", 0) or 0))
  return dataclasses.replace(task, examples=tuple(examples))


def _read_examples(task: Task, limit: int) -> list[dict[str, Any]]:
  required = {"multiple_choice": (task.context_field, task.choices_field, task.label_field),
              "cloze": (task.context_field, task.target_field),
              "rolling": (task.text_field,)}[task.type]
  try:
    lines = workdir_lib.read_text(task.data).splitlines()
  except FileNotFoundError:
    raise JaxlmError(f"task {task.name!r}: data file not found: {task.data}") from None
  out = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"task {task.name!r}: {task.data}:{n}"
    try:
      ex = json.loads(line)
    except json.JSONDecodeError as e:
      raise JaxlmError(f"{where}: not JSON ({e.msg})") from None
    missing = [f for f in required if not isinstance(ex, dict) or f not in ex]
    if missing:
      raise JaxlmError(f"{where}: the example lacks the field {missing[0]!r}")
    if task.type == "multiple_choice":
      choices, label = ex[task.choices_field], ex[task.label_field]
      if not isinstance(choices, list) or len(choices) < 2 or not all(
          isinstance(c, str) for c in choices):
        raise JaxlmError(f"{where}: {task.choices_field!r} must be a list of two or more "
                         "strings")
      if not isinstance(label, int) or not 0 <= label < len(choices):
        raise JaxlmError(f"{where}: label {label!r} is out of range for {len(choices)} "
                         "choices (0-based)")
    ex["_where"] = where
    out.append(ex)
    if limit and len(out) == limit:
      break
  if not out:
    raise JaxlmError(f"task {task.name!r}: {task.data} has no examples")
  return out


def _answer(task: Task, ex: dict[str, Any]) -> str:
  if task.type == "multiple_choice":
    return ex[task.choices_field][ex[task.label_field]]
  return ex[task.target_field]


def contexts(task: Task) -> list[str]:
  """Each example's context with its few-shot examples before it (deterministic)."""
  rng = np.random.default_rng(task.fewshot_seed)
  out = []
  for i, ex in enumerate(task.examples):
    prefix = ""
    if task.num_fewshot:
      others = [j for j in range(len(task.examples)) if j != i]
      if len(others) < task.num_fewshot:
        raise JaxlmError(f"task {task.name!r}: num_fewshot={task.num_fewshot} needs more than "
                         f"{len(task.examples)} examples")
      shots = rng.choice(others, size=task.num_fewshot, replace=False)
      prefix = "".join(
          task.examples[j][task.context_field] + task.target_delimiter +
          _answer(task, task.examples[j]) + task.fewshot_delimiter for j in shots)
    out.append(prefix + ex[task.context_field])
  return out


def requests(task: Task, tokenizer: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                                 list[str]]:
  """The encoded (context, continuation) pairs of a multiple_choice or cloze task, in order
  (each example's choices together), and the example each comes from (for messages)."""
  out, names = [], []
  for ex, ctx in zip(task.examples, contexts(task), strict=True):
    conts = ex[task.choices_field] if task.type == "multiple_choice" else [ex[task.target_field]]
    for c in conts:
      out.append(scorer_lib.encode_pair(tokenizer, ctx, task.target_delimiter + c))
      names.append(ex["_where"])
  return out, names


def evaluate(task: Task, scorer: scorer_lib.Scorer,
             encoded: tuple[list, list[str]] | None = None) -> dict[str, float]:
  """The task's metrics (see the module docstring) under `scorer`'s model; `encoded` is
  `requests(task, ...)` when the caller has it already."""
  if task.type == "rolling":
    texts = [ex[task.text_field] for ex in task.examples]
    scores = scorer.loglikelihood_rolling(texts)
    nats = sum(s.logprob for s in scores)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    return {"logprob": nats / len(texts), "bpb": -nats / math.log(2) / max(n_bytes, 1),
            "word_perplexity": math.exp(min(-nats / max(words, 1), 700.0)), "chance": 0.0}
  pairs, names = encoded or requests(task, scorer.tokenizer)
  scores = scorer.loglikelihood(pairs, names)
  if task.type == "cloze":
    return {"acc": float(np.mean([s.greedy for s in scores])),
            "logprob": float(np.mean([s.logprob for s in scores])), "chance": 0.0}
  acc, acc_norm, chance = [], [], []
  k = 0
  for ex in task.examples:
    choices = ex[task.choices_field]
    ll = np.array([s.logprob for s in scores[k:k + len(choices)]])
    # As lm-eval: divided by the choice's length in characters (without the delimiter).
    lengths = np.array([max(len(c), 1) for c in choices], dtype=np.float64)
    k += len(choices)
    acc.append(int(np.argmax(ll)) == ex[task.label_field])
    acc_norm.append(int(np.argmax(ll / lengths)) == ex[task.label_field])
    chance.append(1.0 / len(choices))
  return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
          "chance": float(np.mean(chance))}


def core(results: dict[str, dict[str, float]]) -> float:
  """nanochat's CORE-style aggregate: each task's accuracy centred on chance, (acc - chance)
  / (1 - chance), averaged over the tasks that have an accuracy."""
  centred = [(r["acc"] - r["chance"]) / (1 - r["chance"]) for r in results.values()
             if "acc" in r and r["chance"] < 1]
  return float(np.mean(centred)) if centred else float("nan")
