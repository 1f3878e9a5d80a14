"""Golden numbers: the smoke config's first training steps, pinned to catch silent changes.

The loss and gradient norm of each of the first steps of configs/smoke.py, run through the
public entry point `train.train_and_evaluate` and read back from metrics.jsonl, must match the
numbers below. A refactor (moving code between modules, renaming classes, splitting the step
builder) must leave every one of them unchanged within the tolerance.

UPDATE THE NUMBERS ONLY IF THE CHANGE IS MEANT TO CHANGE THE NUMERICS: parameter init, the
data order or batching, the model's math, the loss, the optimizer or the schedule. Never update
them to make a refactor pass; a mismatch after a refactor is a behaviour change to find. Say in
the commit message why the numbers moved.

To regenerate (on CPU, the tests' 8 fake devices; the batch is split 8 ways, so the device
count is part of the setup):

  python tests/golden_test.py

prints a GOLDEN table to paste below. The numbers were identical bit for bit across repeated
runs on one machine (jax/jaxlib 0.10.2, optax 0.2.8); the tolerance only leaves room for
other CPUs and XLA versions reordering float32 sums.
"""

import json
import math
import os

import pytest
from conftest import load_config

from jaxlm import train

STEPS = 5
VOCAB = 65  # The char tokenizer of tiny-shakespeare (configs/smoke.py's docstring: ln 65).
RTOL = 1e-5

# step: (train/loss, grad_norm) of configs/smoke.py with the overrides of `golden_config`.
GOLDEN = {
    1: (4.178879261016846, 1.940760612487793),
    2: (4.183059215545654, 1.9066355228424072),
    3: (4.154425621032715, 2.2198827266693115),
    4: (4.0749125480651855, 1.8580833673477173),
    5: (4.0039520263671875, 1.354963779449463),
}


def golden_config():
  cfg = load_config("smoke")
  cfg.train.steps = STEPS
  cfg.train.log_every = 1  # Every step's own loss (a log record averages the steps since the last).
  cfg.train.steps_per_call = 1
  cfg.train.eval_every = 0  # No evaluation: the pinned numbers are training steps only.
  cfg.checkpoint.every = 0  # One checkpoint, at the end.
  cfg.sample.max_new_tokens = 1  # The closing sample is unavoidable; keep it short.
  return cfg


def run_steps(workdir: str) -> dict[int, dict]:
  train.train_and_evaluate(golden_config(), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r for r in records if "train/loss" in r}


@pytest.mark.slow
def test_smoke_config_first_steps_match_the_golden_numbers(tmp_path):
  steps = run_steps(str(tmp_path / "run"))
  assert sorted(steps) == list(range(1, STEPS + 1))
  mismatches = []
  for step, (loss, grad_norm) in GOLDEN.items():
    got = steps[step]
    for key, want in (("train/loss", loss), ("grad_norm", grad_norm)):
      if not math.isclose(got[key], want, rel_tol=RTOL):
        mismatches.append(f"step {step} {key}: got {got[key]!r}, pinned {want!r}")
  assert not mismatches, ("the smoke run's numerics changed (see this file's docstring before "
                          "updating the numbers):\n" + "\n".join(mismatches))

  # Independent sanity checks, which hold whatever the pinned numbers are.
  # A freshly initialised model predicts nearly uniformly: the first loss is about ln(vocab).
  assert abs(steps[1]["train/loss"] - math.log(VOCAB)) < 0.05
  # Warmup is linear from 0 over the run (warmup_steps 5 >= steps 5): step s runs at
  # lr * (s - 1) / 5, so step 1 changes nothing.
  for step, record in steps.items():
    assert math.isclose(record["lr"], 3e-3 * (step - 1) / STEPS, rel_tol=1e-6, abs_tol=1e-12)
  assert steps[STEPS]["train/loss"] < steps[1]["train/loss"] - 0.1  # It learns.


if __name__ == "__main__":
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    steps = run_steps(os.path.join(tmp, "run"))
  print("GOLDEN = {")
  for step, r in sorted(steps.items()):
    print(f"    {step}: ({r['train/loss']!r}, {r['grad_norm']!r}),")
  print("}")
