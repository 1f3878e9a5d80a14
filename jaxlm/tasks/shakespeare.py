"""The shipped tasks: built deterministically from the held-out tenth of tiny-shakespeare.

A model trained on the shipped corpus never saw this text (it is the default experiment's
validation split, the last data.val_fraction = 10% of the characters), yet its style is what the
model learned, so accuracy starts at chance and rises as it trains:

  shakespeare_next_line  multiple choice: given up to three lines of a play, which of four lines
                         comes next? The true one, or three taken at random from elsewhere in the
                         held-out text (chance 25%).
  shakespeare_last_word  multiple choice: a line of verse without its last word (4+ letters);
                         which of four words of that length ends it? (chance 25%)
  shakespeare_complete_word  cloze, LAMBADA-style: the same lines with the first two letters of
                         the last word; is the rest the model's greedy continuation? (chance 0)

    python -m jaxlm.tasks.shakespeare      # rewrites jaxlm/tasks/data/ (tests check it is current)
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from jaxlm import data as data_lib

SEED = 17
N_EXAMPLES = 300
VAL_FRACTION = 0.1  # The default experiment's data.val_fraction.
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

TASK_FILES = {
    "shakespeare_next_line": (
        "name: shakespeare_next_line\n"
        "type: multiple_choice\n"
        "data: shakespeare_next_line.jsonl\n"
        "context_field: context\n"
        "choices_field: choices\n"
        "label_field: label\n"
        "target_delimiter: \"\"  # A context ends with a newline; the choice is the next line.\n"),
    "shakespeare_last_word": (
        "name: shakespeare_last_word\n"
        "type: multiple_choice\n"
        "data: shakespeare_last_word.jsonl\n"
        "target_delimiter: \"\"  # The context keeps the space before the word.\n"),
    "shakespeare_complete_word": (
        "name: shakespeare_complete_word\n"
        "type: cloze\n"
        "data: shakespeare_complete_word.jsonl\n"
        "target_delimiter: \"\"  # The target is the rest of a word the context began.\n"),
}


def held_out_text() -> str:
  """The shipped corpus's validation split, as the default experiment cuts it (characters)."""
  raw, _ = data_lib.read_corpus("")
  text = raw.decode("utf-8")
  return text[len(text) - int(len(text) * VAL_FRACTION):]


def next_line_examples(text: str, rng: np.random.Generator) -> list[dict]:
  lines = [ln for ln in text.split("\n")]
  # A line that can be asked about: non-empty, with a non-empty line before it.
  candidates = [i for i in range(3, len(lines)) if len(lines[i]) > 10 and lines[i - 1]]
  pool = [ln for ln in lines if len(ln) > 10]
  out = []
  for i in rng.choice(candidates, size=N_EXAMPLES, replace=False):
    context_lines = []
    for j in range(i - 1, max(i - 4, -1), -1):  # Up to three lines, back to a blank one.
      if not lines[j]:
        break
      context_lines.insert(0, lines[j])
    true = lines[i]
    distractors: list[str] = []
    while len(distractors) < 3:
      c = pool[int(rng.integers(len(pool)))]
      if c != true and c not in distractors:
        distractors.append(c)
    label = int(rng.integers(4))
    choices = distractors[:label] + [true] + distractors[label:]
    out.append({"context": "\n".join(context_lines) + "\n",
                "choices": [c + "\n" for c in choices], "label": label})
  return out


def _line_ends(text: str) -> list[tuple[str, str]]:
  """(line up to its last word, the word) for lines of verse ending in a word of 4+ letters."""
  pattern = re.compile(r"^(.* )([A-Za-z]{4,})([,.;:!?]?)$")
  found = []
  for line in text.split("\n"):
    m = pattern.match(line)
    if m and not line.isupper() and len(m.group(1)) >= 15:
      found.append((m.group(1), m.group(2)))
  return found


def last_word_examples(text: str, rng: np.random.Generator) -> list[dict]:
  """Which of four words of the same length ends the line (so length is no clue)?"""
  found = _line_ends(text)
  by_length: dict[int, list[str]] = {}
  for _, word in found:
    by_length.setdefault(len(word), []).append(word)
  out = []
  for i in rng.permutation(len(found)):
    context, word = found[i]
    others = sorted(set(by_length[len(word)]) - {word})
    if len(others) < 3:
      continue
    distractors = [others[j] for j in rng.choice(len(others), size=3, replace=False)]
    label = int(rng.integers(4))
    out.append({"context": context, "choices": distractors[:label] + [word] + distractors[label:],
                "label": label})
    if len(out) == N_EXAMPLES:
      break
  return out


def complete_word_examples(text: str, rng: np.random.Generator) -> list[dict]:
  """Cloze: the line and the first two letters of its last word; the rest is the target."""
  found = _line_ends(text)
  picks = rng.choice(len(found), size=min(N_EXAMPLES, len(found)), replace=False)
  return [{"context": found[i][0] + found[i][1][:2], "target": found[i][1][2:]}
          for i in sorted(picks)]


def build(out_dir: str = HERE) -> None:
  os.makedirs(out_dir, exist_ok=True)
  text = held_out_text()
  rng = np.random.default_rng(SEED)
  sets = {"shakespeare_next_line": next_line_examples(text, rng),
          "shakespeare_last_word": last_word_examples(text, rng),
          "shakespeare_complete_word": complete_word_examples(text, rng)}
  for name, examples in sets.items():
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples)
    with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
      f.write(TASK_FILES[name])


if __name__ == "__main__":
  build()
  print(f"wrote the shakespeare tasks to {HERE}")
