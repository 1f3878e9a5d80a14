"""A sweep's files: each trial's state (trial.json), metrics and log, and the record sweep.json.

Everything the sweep knows about its trials is in these files, so a later run (or --summarize)
rebuilds it from the workdir alone; this module reads and writes them and nothing else.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxlm import workdir as workdir_lib
from jaxlm.sweep.plan import Sweep, TrialSpec

METRIC = "val/loss"  # Every sweep minimises the final validation loss of its trials.
STATE_FILE = "trial.json"
LOG_FILE = "train.log"


# ---------------------------------------------------------------------------------------------
# Trial state on disk.
# ---------------------------------------------------------------------------------------------

def read_state(trial_dir: str) -> dict[str, Any] | None:
  path = workdir_lib.path(trial_dir) / STATE_FILE
  if not path.exists():
    return None
  return json.loads(workdir_lib.read_text(path))


def write_state(trial_dir: str, state: dict[str, Any]) -> None:
  os.makedirs(trial_dir, exist_ok=True)
  # Atomic (a reader never sees half a file); insertion order: the sweep file's order of keys.
  workdir_lib.write_text(os.path.join(trial_dir, STATE_FILE), json.dumps(state, indent=2))


def normal(x: Any) -> Any:
  """`x` as it reads back from JSON (tuples as lists...): comparable with a trial.json."""
  return json.loads(json.dumps(x))


def trial_identity(sweep: Sweep, spec: TrialSpec) -> dict[str, Any]:
  """The part of a trial's state that says which trial it is (what `is_finished` compares)."""
  return {"name": spec.name, "overrides": normal(spec.overrides),
          "base_overrides": normal(sweep.base_overrides)}


def failed_state(state: dict[str, Any], error: str, **fields: Any) -> dict[str, Any]:
  """`state` marked failed with `error`, then `fields`: how every failed trial is recorded.

  A trial fails when validate_config rejects its values (it never runs: attempts 0), when its
  process exits with an error, or when it ends without writing a val/loss.
  """
  return {**state, "status": "failed", "error": error, **fields}


def is_finished(state: dict[str, Any] | None, sweep: Sweep, spec: TrialSpec) -> bool:
  """Done with these very overrides (a changed command line runs the trial again)."""
  return (state is not None and state.get("status") == "done"
          and state.get("overrides") == normal(spec.overrides)
          and state.get("base_overrides") == normal(sweep.base_overrides))


def write_sweep_json(sweep: Sweep, workdir: str) -> None:
  record = {"config": sweep.config_path, "base_overrides": normal(sweep.base_overrides),
            "trials": [s.name for s in sweep.trials or []],
            "search_space": normal(sweep.space), "n_trials": sweep.n_trials}
  if sweep.ladder is not None:  # What the summary fits (jaxlm/sweep/scaling.py).
    record["ladder"] = normal(sweep.ladder)
  workdir_lib.write_text(os.path.join(workdir, "sweep.json"), json.dumps(record, indent=2))


# ---------------------------------------------------------------------------------------------
# A trial's metrics and log.
# ---------------------------------------------------------------------------------------------

def read_metrics(trial_dir: str) -> list[dict[str, Any]]:
  """A run's metrics.jsonl records (local or gs://; see workdir.Appender for how it is kept)."""
  path = workdir_lib.path(trial_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = workdir_lib.read_text(path).splitlines(keepends=True)
  # A line still being written is skipped.
  return [json.loads(line) for line in lines if line.endswith("\n")]


def final(records: list[dict[str, Any]], key: str) -> float | None:
  """The last numeric value of `key` in `records` (None if it has none)."""
  values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
  return float(values[-1]) if values else None


class MetricsTail:
  """Reads the records appended to a trial's metrics.jsonl since the last call."""

  def __init__(self, trial_dir: str):
    self.path = os.path.join(trial_dir, "metrics.jsonl")
    self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path, "rb") as f:
      f.seek(self.offset)
      data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    self.offset += len(complete)
    return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line]


def error_line(log_path: str, offset: int = 0) -> str:
  """The `jaxlm: error:` line of a trial's log since `offset`, else its last line."""
  try:
    with open(log_path, "rb") as f:
      f.seek(offset)
      lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()]
  except OSError:
    return "no log"
  lines = [line for line in lines if line]
  errors = [line for line in lines if line.startswith("jaxlm: error:")]
  line = errors[-1][len("jaxlm: error:"):].strip() if errors else (lines[-1] if lines else "")
  return (line[:300] + "...") if len(line) > 300 else (line or "exited with no output")
