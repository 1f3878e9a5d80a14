"""Weights & Biases as a sink of the metrics writer: its records, the resolved config, tables.

wandb is an optional extra (jaxlm[wandb]): this module imports it only when metrics.wandb is
on, so a run without it never pays for the import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import string
import types
from typing import Any

import ml_collections
from etils import epath

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

MODES = ("online", "offline", "disabled")
# The workdir's W&B run id: written at the first start, read at every resume, so that a
# resumed run (or a retried sweep trial) continues the same W&B run.
RUN_FILE = "wandb_run.json"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The W&B run of one workdir: the metrics section with its defaults filled in."""
  project: str
  entity: str  # "" = the user's default entity.
  name: str
  group: str  # "" = none.
  mode: str  # "" = W&B's own choice (WANDB_MODE, `wandb offline`, else online).
  config: dict[str, Any]  # The resolved config, as config.json holds it.


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  """metrics.wandb; configs saved before the metrics section existed read as off."""
  return "metrics" in cfg and bool(cfg.metrics.wandb)


def import_wandb() -> types.ModuleType:
  try:
    import wandb
  except ImportError:
    raise JaxlmError("metrics.wandb=True needs wandb, which is not installed: "
                     "pip install 'jaxlm[wandb]' (or pip install wandb)") from None
  return wandb


def check(cfg: ml_collections.ConfigDict) -> None:
  """With metrics.wandb on: a known wandb_mode and an importable wandb, else JaxlmError."""
  if not enabled(cfg):
    return
  mode = cfg.metrics.wandb_mode
  if mode and mode not in MODES:
    raise JaxlmError(f"unknown metrics.wandb_mode={mode!r}: expected one of "
                     f"{', '.join(MODES)} or \"\" (W&B's own choice)")
  import_wandb()


def settings(cfg: ml_collections.ConfigDict, workdir: str,
             resolved: dict[str, Any]) -> Settings | None:
  """The W&B run that `cfg` asks for in `workdir`, or None when metrics.wandb is off."""
  if not enabled(cfg):
    return None
  m = cfg.metrics
  name = m.wandb_name or os.path.basename(workdir_lib.absolute(workdir).rstrip("/"))
  return Settings(project=m.wandb_project, entity=m.wandb_entity, name=name,
                  group=m.wandb_group, mode=m.wandb_mode, config=resolved)


def run_id(root: epath.Path) -> str:
  """The W&B run id of the workdir `root`: read from RUN_FILE, else made up and written there."""
  path = root / RUN_FILE
  if path.exists():
    return json.loads(workdir_lib.read_text(path))["id"]
  # W&B run ids are unique per project; 8 of 36 symbols make a clash between runs unlikely.
  new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  workdir_lib.write_text(path, json.dumps({"id": new_id}) + "\n")
  return new_id


class WandbSink:
  """One W&B run, opened or resumed at construction and finished at close."""

  def __init__(self, root: epath.Path, run: Settings):
    self._wandb = import_wandb()
    self._run = self._wandb.init(
        id=run_id(root), resume="allow", project=run.project or None,
        entity=run.entity or None, name=run.name, group=run.group or None,
        mode=run.mode or None, config=run.config)

  def log(self, record: dict[str, Any]) -> None:
    """One metrics.jsonl record: its "step" is W&B's step, every other key a value there.

    Records of one step (a log step's and an evaluation's) become one W&B history row.
    """
    self._run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

  def table(self, step: int, key: str, rows: list[dict[str, Any]]) -> None:
    """`rows` (dicts of column -> value) as one wandb.Table under `key` at `step`."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    data = [[row.get(c) for c in columns] for row in rows]
    self._run.log({key: self._wandb.Table(columns=columns, data=data)}, step=step)

  def close(self, failed: bool = False) -> None:
    self._run.finish(exit_code=1 if failed else 0)
