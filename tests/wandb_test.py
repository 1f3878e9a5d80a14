"""Weights & Biases: offline runs read back from their files match metrics.jsonl; resume; sweeps."""

import collections
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, load_config, run_jaxlm

from jaxlm import config as config_lib
from jaxlm import train, wandb_sink
from jaxlm.errors import JaxlmError
from jaxlm.sweep import plan

# A .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log records in 32 KiB
# blocks, each a 7-byte header (checksum, length, kind) and a piece of one protobuf Record.
BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list:
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  records, pieces, pos = [], b"", HEADER
  while pos + HEADER <= len(data):
    if BLOCK - pos % BLOCK < HEADER:  # Too short for a header: the block's padding.
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
    assert kind in (FULL, FIRST, MIDDLE, LAST), (path, pos, kind)
    pieces += data[pos + HEADER:pos + HEADER + length]
    pos += HEADER + length
    if kind in (FULL, LAST):
      records.append(wandb_internal_pb2.Record.FromString(pieces))
      pieces = b""
  return records


def as_dict(items) -> dict:
  """History, summary or config items as a dict (nested keys as nested dicts)."""
  out = {}
  for item in items:
    *parents, key = list(item.nested_key) or [item.key]
    node = out
    for parent in parents:
      node = node.setdefault(parent, {})
    node[key] = json.loads(item.value_json)
  return out


def offline_runs(wandb_dir, run_id: str) -> list[dict]:
  """Each offline run of `run_id`, oldest first: its run record, history rows and directory."""
  out = []
  for run_dir in sorted(glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}"))):
    records = read_records(os.path.join(run_dir, f"run-{run_id}.wandb"))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = [as_dict(r.history.item) for r in records
               if r.WhichOneof("record_type") == "history"]
    out.append({"run": run, "history": history, "dir": run_dir})
  return out


def jsonl_by_step(workdir) -> dict[int, dict]:
  """metrics.jsonl's records, those of one step merged (as W&B makes them one history row)."""
  rows = collections.defaultdict(dict)
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    rows[record.pop("step")].update(record)
  return dict(rows)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """The smoke model stopped at step 10 (train.stop_at), then resumed to 20, logging to W&B."""
  tmp = tmp_path_factory.mktemp("wandb")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("WANDB_MODE", "offline")
    for var, sub in [("WANDB_DIR", "runs"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")]:
      os.makedirs(tmp / sub)
      mp.setenv(var, str(tmp / sub))
    workdir = str(tmp / "smoke-run")
    for stop_at in (10, 0):
      cfg = load_config("smoke")
      cfg.train.steps, cfg.train.eval_every, cfg.train.eval_steps = 20, 10, 1
      cfg.train.stop_at = stop_at
      cfg.metrics.wandb, cfg.metrics.wandb_group = True, "tests"
      train.train_and_evaluate(cfg, workdir)
  run_id = json.load(open(os.path.join(workdir, wandb_sink.RUN_FILE)))["id"]
  return {"workdir": workdir, "id": run_id, "runs": offline_runs(tmp / "runs", run_id)}


@pytest.mark.slow
def test_history_is_metrics_jsonl(resumed_run):
  logged = {}
  for run in resumed_run["runs"]:
    for row in run["history"]:
      logged[row["_step"]] = {k: v for k, v in row.items()
                              if not k.startswith("_") and k != "eval/table"}
  expected = jsonl_by_step(resumed_run["workdir"])
  assert sorted(expected) == [0, 5, 10, 15, 20]
  assert logged == expected
  assert {"train/loss", "lr", "mfu", "val/loss", "wall_time_sec"} <= set(logged[20])


@pytest.mark.slow
def test_resume_continues_the_same_run(resumed_run):
  first, second = resumed_run["runs"]  # No third: every start used the workdir's run id.
  assert first["run"].run_id == second["run"].run_id == resumed_run["id"]
  assert [row["_step"] for row in first["history"]] == [0, 5, 10]
  assert [row["_step"] for row in second["history"]] == [15, 20]


@pytest.mark.slow
def test_resolved_config_names_and_group_are_logged(resumed_run):
  saved = json.load(open(os.path.join(resumed_run["workdir"], "config.json")))  # The 2nd's.
  for run, stop_at in zip(resumed_run["runs"], (10, 0), strict=True):
    config = as_dict(run["run"].config.update)
    config.pop("_wandb", None)
    assert config == {**saved, "train": {**saved["train"], "stop_at": stop_at}}
    assert config["model"]["vocab_size"] == 65  # Resolved: 0 in the config file.
    assert (run["run"].project, run["run"].display_name, run["run"].run_group) == (
        "jaxlm", "smoke-run", "tests")


@pytest.mark.slow
def test_each_evaluation_logs_a_table_of_its_results(resumed_run):
  expected = jsonl_by_step(resumed_run["workdir"])
  tables = {row["_step"]: (run["dir"], row["eval/table"]) for run in resumed_run["runs"]
            for row in run["history"] if "eval/table" in row}
  assert sorted(tables) == [0, 10, 20]
  for step, (run_dir, ref) in tables.items():
    assert ref["_type"] == "table-file"
    table = json.load(open(os.path.join(run_dir, "files", ref["path"])))
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert sorted(rows) == ["train", "val"]
    assert rows["val"]["loss"] == expected[step]["val/loss"]
    assert rows["val"]["bpb"] == expected[step]["val/bpb"]
    assert rows["train"]["perplexity"] == expected[step]["eval_train/perplexity"]


def test_sweep_trials_are_named_after_the_trial_and_grouped_by_sweep(tmp_path):
  cfg = load_config("smoke")
  trial_dir = str(tmp_path / "lr-sweep" / "optim.lr=0.001")
  command = lambda cfg, overrides: plan.train_command(
      plan.Sweep(config_path="sweep.py", cfg=cfg, base_overrides={}), trial_dir, overrides)
  assert not any("metrics." in flag for flag in command(cfg, {"optim.lr": 1e-3}))  # W&B off.
  expected = ["--config.metrics.wandb_group=lr-sweep",
              "--config.metrics.wandb_name=optim.lr=0.001"]
  assert command(cfg, {"optim.lr": 1e-3, "metrics.wandb": True})[-2:] == expected
  cfg.metrics.wandb = True
  assert command(cfg, {"optim.lr": 1e-3})[-2:] == expected
  cfg.metrics.wandb_group = "mine"  # The user's group is kept.
  assert [f for f in command(cfg, {}) if "metrics." in f] == [expected[1]]
  del cfg["metrics"]  # A config from before the metrics section.
  assert not any("metrics." in flag for flag in command(cfg, {}))


def test_missing_wandb_is_a_one_line_error_before_anything_is_built(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # Makes `import wandb` fail.
  cfg = load_config("smoke")
  config_lib.validate_config(cfg)  # Off by default: wandb is never imported.
  cfg.metrics.wandb = True
  with pytest.raises(JaxlmError) as e:
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert "needs wandb, which is not installed: pip install 'jaxlm[wandb]'" in str(e.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_wandb_from_the_command_line(tmp_path, monkeypatch):
  fake = tmp_path / "no_wandb"
  fake.mkdir()
  (fake / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
  path = [str(fake), *filter(None, [os.environ.get("PYTHONPATH")])]
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
  proc = run_jaxlm("train", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "run"),
                   "--config.metrics.wandb=true")
  assert_one_line_error(proc, "pip install 'jaxlm[wandb]'")
  assert "compiled" not in proc.stderr


def test_unknown_wandb_mode():
  cfg = load_config("smoke")
  cfg.metrics.wandb, cfg.metrics.wandb_mode = True, "cloud"
  with pytest.raises(JaxlmError, match="unknown metrics.wandb_mode='cloud'"):
    config_lib.validate_config(cfg)


def test_a_run_without_wandb_never_imports_it():
  code = ("import sys; from jaxlm import config, metrics, train; "
          "print('wandb' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "False"
