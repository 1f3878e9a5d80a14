"""Sweeps: trial helpers, validation, grid runs end to end, kill and resume, failures, Optuna."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import CONFIGS, assert_one_line_error, jaxlm_script, run_jaxlm

from jaxlm import sweep
from jaxlm.errors import JaxlmError

SMOKE = os.path.join(CONFIGS, "smoke.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Every test sweep trains the smoke model for 10 steps: the cost is startup and compilation.
HEADER = f'''
from jaxlm import sweep


def get_config():
  c = sweep.load_experiment({SMOKE!r})
  c.train.steps = 10
  c.train.eval_every = 5
  c.train.eval_steps = 1
  c.train.log_every = 5
  c.checkpoint.every = 10
  return c
'''


def sweep_file(tmp_path, body: str, name: str = "test_sweep.py") -> str:
  path = tmp_path / name
  path.write_text(HEADER + textwrap.dedent(body))
  return str(path)


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def metrics(trial_dir):
  with open(os.path.join(trial_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def state(trial_dir):
  with open(os.path.join(trial_dir, "trial.json")) as f:
    return json.load(f)


def val_losses(trial_dir):
  return [r["val/loss"] for r in metrics(trial_dir) if "val/loss" in r]


def assert_png(path):
  data = open(path, "rb").read()
  assert data[:8] == PNG_MAGIC and len(data) > 1000, path


# ---------------------------------------------------------------------------------------------
# Helpers for sweep files.
# ---------------------------------------------------------------------------------------------

def test_importing_the_sweep_package_is_cheap():
  # Every sweep file does `from jaxlm import sweep`: that must not start jax, optuna or matplotlib.
  code = ("import sys, jaxlm.sweep; "
          "print([m for m in ('jax', 'optuna', 'matplotlib') if m in sys.modules])")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"


def test_product_zip_and_axis():
  grid = sweep.product({"optim.lr": [1e-3, 3e-3]}, sweep.axis("model.n_layer", [1, 2]))
  assert grid == [{"optim.lr": 1e-3, "model.n_layer": 1}, {"optim.lr": 1e-3, "model.n_layer": 2},
                  {"optim.lr": 3e-3, "model.n_layer": 1}, {"optim.lr": 3e-3, "model.n_layer": 2}]
  pairs = sweep.zipped({"optim.lr": [1e-3, 3e-3], "optim.min_lr": [1e-4, 3e-4]})
  assert pairs == [{"optim.lr": 1e-3, "optim.min_lr": 1e-4},
                   {"optim.lr": 3e-3, "optim.min_lr": 3e-4}]
  assert len(sweep.product(pairs, {"seed": [0, 1, 2]})) == 6
  with pytest.raises(JaxlmError, match="differ in length: 2, 3"):
    sweep.zipped({"optim.lr": [1, 2]}, {"seed": [0, 1, 2]})
  with pytest.raises(JaxlmError, match="optim.lr is swept twice"):
    sweep.product({"optim.lr": [1e-3]}, {"optim.lr": [3e-3]})


def test_random_samples_are_seeded_and_in_range():
  space = {"optim.lr": sweep.log_uniform(1e-4, 1e-2), "model.dropout": sweep.uniform(0.0, 0.2),
           "model.n_layer": sweep.integer(1, 3), "optim.name": sweep.choice("adamw", "lion")}
  a = sweep.sample(space, 50, seed=1)
  assert a == sweep.sample(space, 50, seed=1) and a != sweep.sample(space, 50, seed=2)
  assert all(1e-4 <= t["optim.lr"] <= 1e-2 and 0 <= t["model.dropout"] <= 0.2 for t in a)
  assert {t["model.n_layer"] for t in a} == {1, 2, 3}  # Both ends included.
  assert {t["optim.name"] for t in a} == {"adamw", "lion"}
  # Log-uniform: about as many draws below 1e-3 as above.
  assert 15 <= sum(t["optim.lr"] < 1e-3 for t in a) <= 35
  with pytest.raises(JaxlmError, match="log_uniform needs low > 0"):
    sweep.sample({"optim.lr": ("log_uniform", 0.0, 1.0)}, 1)
  with pytest.raises(JaxlmError, match="range of optim.lr: expected"):
    sweep.sample({"optim.lr": ("normal", 0.0, 1.0)}, 1)


def test_trial_names_are_readable_unique_directory_names():
  assert sweep.trial_name({"optim.lr": 3e-4}) == "optim.lr=0.0003"
  assert sweep.trial_name({"optim.lr": 1e-2, "model.n_layer": 6}) == \
      "optim.lr=0.01,model.n_layer=6"
  assert sweep.trial_name({}) == "defaults"
  assert "/" not in sweep.trial_name({"data.path": "/data/corpus.txt"})
  long = sweep.trial_name({f"k{i}.key": i for i in range(30)})
  assert len(long) <= 120 and long != sweep.trial_name({f"k{i}.key": i for i in range(31)})


def test_log_axis_only_when_values_span_more_than_ten_times():
  assert sweep.log_axis([3e-4, 1e-3, 3e-3, 1e-2])
  assert not sweep.log_axis([1e-3, 1e-2])  # Exactly 10x.
  assert not sweep.log_axis([2, 4, 8]) and not sweep.log_axis(["a", "b"])
  assert not sweep.log_axis([0.0, 1.0, 100.0])


def test_trials_are_checked_against_the_locked_config():
  cfg = sweep.load_experiment(SMOKE)
  cfg.lock()
  specs = sweep.plan_trials(cfg, [{"optim.lr": 1e-3}, {"optim.lr": 1}, {"model.d_model": 30}])
  assert [s.name for s in specs] == ["optim.lr=0.001", "optim.lr=1", "model.d_model=30"]
  assert specs[0].error is None and specs[0].steps == cfg.train.steps
  assert specs[1].error is None  # An int is a fine float.
  # An impossible value fails only its own trial.
  assert "not divisible by model.n_head" in specs[2].error
  cases = [
      ([{"optim.lr": 1e-3}, {"optim.lrr": 1e-3}],
       "trial 2/2 (optim.lrr=0.001): unknown config key optim.lrr (did you mean optim.lr?)"),
      ([{"model.n_layer": "three"}],
       "trial 1/1 (model.n_layer=three): model.n_layer must be int, got str 'three'"),
      ([{"model.n_layer": True}], "model.n_layer must be int, got bool True"),
      ([{"model.n_layer": 2.5}], "model.n_layer must be int, got float 2.5"),
      ([{"model": 3}], "model is a config section"),
      ([{"optim.lr": [1e-3]}], "must be a bool, int, float or str"),
      ([], "the sweep is empty"),
      ([{"seed": 1}, {"seed": 1}], "trial 2/2 repeats trial 1/2 (seed=1)"),
  ]
  for trials, message in cases:
    with pytest.raises(JaxlmError) as e:
      sweep.plan_trials(cfg, trials)
    assert message in str(e.value), (trials, str(e.value))
  assert cfg.optim.lr == 3e-3  # The base config is never modified.


# ---------------------------------------------------------------------------------------------
# The `jaxlm sweep` command: bad input fails before anything runs.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, fragments", [
    ('def get_sweep():\n  return [{"optim.lr": 1e-3}, {"optim.lrr": 3e-3}]\n',
     ["trial 2/2 (optim.lrr=0.003)", "unknown config key optim.lrr", "did you mean optim.lr"]),
    ('def get_sweep():\n  return [{"model.n_layer": "three"}]\n',
     ["trial 1/1 (model.n_layer=three)", "model.n_layer must be int, got str"]),
    ('def get_sweep():\n  return []\n', ["the sweep is empty"]),
    ('def get_search_space():\n  return {"optim.lrr": ("log_uniform", 1e-4, 1e-2)}\n',
     ["search space: unknown config key optim.lrr"]),
    ('def get_search_space():\n  return {"optim.lr": ("log_uniform", 1e-4, 1e-2)}\n',
     ["needs a number of trials", "N_TRIALS"]),
    ("X = 1\n", ["must define get_sweep()", "not neither"]),
], ids=["unknown_key", "wrong_type", "empty", "bad_space_key", "no_n_trials", "no_trials"])
def test_bad_sweep_files_are_one_line_errors_before_anything_runs(tmp_path, body, fragments):
  workdir = tmp_path / "sw"
  proc = run_jaxlm("sweep", "--config", sweep_file(tmp_path, body), "--workdir", str(workdir))
  assert_one_line_error(proc, *fragments)
  assert not workdir.exists()


def test_missing_optuna_is_a_one_line_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "optuna", None)  # Makes `import optuna` fail.
  path = sweep_file(tmp_path, '''
      N_TRIALS = 2


      def get_search_space():
        return {"optim.lr": sweep.log_uniform(1e-4, 1e-2)}
      ''')
  cfg = sweep.load_module(path).get_config()
  cfg.lock()
  plan = sweep.prepare(path, cfg, {})  # Checking the space needs no optuna...
  with pytest.raises(JaxlmError, match=r"needs optuna, which is not installed: pip install"):
    sweep.run(plan, str(tmp_path / "w"))  # ...running it does, and says how to get it.
  assert not (tmp_path / "w").exists()


def test_bad_sweep_flags(tmp_path):
  grid = sweep_file(tmp_path, 'def get_sweep():\n  return [{"seed": 1}]\n')
  proc = run_jaxlm("sweep", "--config", grid, "--workdir", str(tmp_path / "w"), "--worker")
  assert_one_line_error(proc, "--worker and --storage are for adaptive searches")
  proc = run_jaxlm("sweep", "--config", grid, "--workdir", str(tmp_path / "w"), "--parallel=0")
  assert_one_line_error(proc, "--parallel must be >= 1")
  proc = run_jaxlm("sweep", "--summarize", "--workdir", str(tmp_path / "nothing"))
  assert_one_line_error(proc, "no sweep in")
  proc = run_jaxlm("sweep", "--config", grid)
  assert_one_line_error(proc, "--workdir is required")


# ---------------------------------------------------------------------------------------------
# End to end: real `jaxlm train` trials.
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grid_sweep_end_to_end_table_and_plots(tmp_path):
  config = sweep_file(tmp_path, '''
      def get_sweep():
        return sweep.product({"optim.lr": [3e-4, 1e-2], "model.n_layer": [1, 2]})
      ''')
  workdir = tmp_path / "sw"
  proc = run_jaxlm("sweep", "--config", config, "--workdir", str(workdir), "--parallel", "2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sweep: 4/4 done, 0 running, 0 failed" in proc.stderr
  assert "best val loss" in proc.stderr

  rows = read_csv(workdir / "results.csv")
  assert [r["trial"] for r in rows if r["status"] == "done"] == [r["trial"] for r in rows]
  assert {r["trial"] for r in rows} == {f"optim.lr={lr},model.n_layer={n}"
                                        for lr in ("0.0003", "0.01") for n in (1, 2)}
  finals = [float(r["final_val_loss"]) for r in rows]
  assert finals == sorted(finals)  # Best first.
  for r in rows:
    trial_dir = workdir / r["trial"]
    vals = val_losses(trial_dir)
    assert float(r["final_val_loss"]) == vals[-1] and float(r["best_val_loss"]) == min(vals)
    assert int(r["steps"]) == 10 and float(r["tokens_per_sec"]) > 0
    assert float(r["wall_time_sec"]) == metrics(trial_dir)[-1]["wall_time_sec"]
    saved = json.loads((trial_dir / "config.json").read_text())
    assert saved["optim"]["lr"] == float(r["optim.lr"])  # The trial really ran its overrides.
    assert saved["model"]["n_layer"] == int(r["model.n_layer"])
    assert "step 10/10" in (trial_dir / "train.log").read_text()  # Its own log file.

  table = (workdir / "results.md").read_text()
  lines = [line for line in table.splitlines() if line.startswith("| ")]
  assert "final val loss" in lines[0] and "`optim.lr`" in lines[0] and "status" in lines[0]
  for i, r in enumerate(rows, 1):  # Same order, same numbers.
    assert lines[i].startswith(f"| {i} | ") and f"{float(r['final_val_loss']):.4f}" in lines[i]
  plots = ["val_loss_vs_optim.lr.png", "val_loss_vs_model.n_layer.png", "loss_curves.png"]
  for name in plots:
    assert_png(workdir / name)
    assert f"]({name})" in table

  # --summarize rebuilds everything from the trial directories alone.
  before = (workdir / "results.csv").read_text()
  for name in ["results.csv", "results.md", *plots]:
    (workdir / name).unlink()
  proc = run_jaxlm("sweep", "--summarize", "--workdir", str(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "results.csv").read_text() == before
  for name in plots:
    assert_png(workdir / name)


def wait_until(condition, timeout=240, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the sweep exited early: {proc.returncode}")
    time.sleep(0.1)
  raise AssertionError("timed out")


@pytest.mark.slow
def test_killed_sweep_resumes_and_never_reruns_a_finished_trial(tmp_path):
  # Long enough that it is still training when the short trial (run beside it) is done, even on
  # a loaded machine: 600 steps once finished first under load, and the kill found nothing to do.
  long = {"optim.lr": 2e-3, "train.steps": 3000, "train.eval_every": 1500,
          "checkpoint.every": 500}
  config = sweep_file(tmp_path, f'''
      def get_sweep():
        return [{{"optim.lr": 1e-3}}, {long!r}, {{"optim.lr": 3e-3}}]
      ''')
  workdir = tmp_path / "sw"
  short, slow, last = (workdir / sweep.trial_name(t) for t in
                       ({"optim.lr": 1e-3}, long, {"optim.lr": 3e-3}))
  args = ["sweep", "--config", config, "--workdir", str(workdir), "--parallel", "2"]
  with open(tmp_path / "first.log", "w") as log:
    proc = subprocess.Popen([jaxlm_script(), *args], stdout=log, stderr=log, text=True)
    try:
      # Kill once the first trial is finished and the long one is training.
      wait_until(lambda: (short / "trial.json").exists() and state(short)["status"] == "done"
                 and (slow / "metrics.jsonl").exists()
                 and any("train/loss" in r for r in metrics(slow)), proc=proc)
      proc.send_signal(signal.SIGINT)
      proc.wait(timeout=180)
    finally:
      proc.kill()
  log = (tmp_path / "first.log").read_text()
  assert proc.returncode == 0, log[-3000:]
  assert "SIGINT received: stopping the sweep" in log and "run the same command to resume" in log
  assert state(short)["status"] == "done"
  assert state(slow)["status"] == "interrupted"
  stopped_at = metrics(slow)[-1]["step"]
  assert metrics(slow)[-1]["wall_time_sec"] and 0 < stopped_at < 3000  # It saved and stopped.

  proc = run_jaxlm(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "3 trials in" in proc.stderr and "1 done" in proc.stderr
  assert "sweep: 3/3 done" in proc.stderr
  # The finished trial was not run again: one attempt, one training run in its log and metrics.
  assert state(short)["attempts"] == 1
  assert (short / "train.log").read_text().count("=== jaxlm sweep: attempt") == 1
  assert sum("wall_time_sec" in r for r in metrics(short)) == 1
  # The interrupted one resumed from its checkpoint rather than starting over.
  assert state(slow)["attempts"] == 2 and state(slow)["status"] == "done"
  assert f"resumed from checkpoint at step {stopped_at}" in (slow / "train.log").read_text()
  assert metrics(slow)[-1]["step"] == 3000
  assert state(last)["status"] == "done"
  rows = {r["trial"]: r for r in read_csv(workdir / "results.csv")}
  assert [r["status"] for r in rows.values()] == ["done"] * 3
  assert float(rows[slow.name]["final_val_loss"]) == val_losses(slow)[-1]


@pytest.mark.slow
def test_failed_trials_are_recorded_with_their_error_and_the_others_complete(tmp_path):
  config = sweep_file(tmp_path, '''
      def get_sweep():
        return [{"optim.lr": 1e-3}, {"model.d_model": 30},
                {"data.path": "/nonexistent/corpus.txt"}]
      ''')
  workdir = tmp_path / "sw"
  proc = run_jaxlm("sweep", "--config", config, "--workdir", str(workdir), "--parallel", "2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sweep: 1/3 done, 0 running, 2 failed" in proc.stderr
  ok, invalid, crashed = (workdir / n for n in
                          ("optim.lr=0.001", "model.d_model=30",
                           "data.path=_nonexistent_corpus.txt"))
  assert state(ok)["status"] == "done"
  # Caught by config.validate_config before anything ran: failed without a process.
  assert state(invalid)["status"] == "failed" and state(invalid)["attempts"] == 0
  assert "not divisible by model.n_head" in state(invalid)["error"]
  # Crashed at run time: the `jaxlm: error:` line of its log.
  assert state(crashed)["status"] == "failed" and state(crashed)["returncode"] == 2
  assert state(crashed)["error"].startswith("corpus not found")
  rows = read_csv(workdir / "results.csv")
  assert [r["status"] for r in rows] == ["done", "failed", "failed"]
  assert {r["error"] for r in rows[1:]} == {state(invalid)["error"], state(crashed)["error"]}
  table = (workdir / "results.md").read_text()
  assert "corpus not found" in table and "not divisible by model.n_head" in table


@pytest.mark.slow
def test_two_workers_share_one_optuna_study(tmp_path):
  import optuna  # Required: without it this test fails (pip install -e '.[dev]' brings it).

  config = sweep_file(tmp_path, '''
      N_TRIALS = 3
      SAMPLER = "random"
      PRUNER = "none"


      def get_search_space():
        return {"optim.lr": sweep.log_uniform(1e-3, 1e-2)}
      ''')
  workdir = tmp_path / "study"
  workers = []
  for i in range(2):
    log = open(tmp_path / f"worker{i}.log", "w")
    workers.append((subprocess.Popen(
        [jaxlm_script(), "sweep", "--config", config, "--workdir", str(workdir), "--worker"],
        stdout=log, stderr=log, text=True), log))
  try:
    for proc, _ in workers:
      proc.wait(timeout=400)
  finally:
    for proc, log in workers:
      proc.kill()
      log.close()
  logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
  for (proc, _), log in zip(workers, logs, strict=True):
    assert proc.returncode == 0, log[-3000:]
  ran = [set(map(int, re.findall(r"trial (\d{4})_\S+: starting", log))) for log in logs]
  assert ran[0] and ran[1] and not ran[0] & ran[1]  # Both worked, on disjoint trials.
  assert ran[0] | ran[1] == {0, 1, 2}

  study = optuna.load_study(study_name="study", storage=f"sqlite:///{workdir}/study.db")
  trials = study.get_trials()
  assert len(trials) == 3
  assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
  for t in trials:
    trial_dir = t.user_attrs["trial_dir"]
    assert state(trial_dir)["attempts"] == 1 and state(trial_dir)["optuna_trial"] == t.number
    assert t.value == val_losses(trial_dir)[-1]
    assert json.load(open(os.path.join(trial_dir, "config.json")))["optim"]["lr"] == \
        t.params["optim.lr"]
  assert not (workdir / "results.csv").exists()  # Workers leave the summary to --summarize.
  proc = run_jaxlm("sweep", "--summarize", "--workdir", str(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(read_csv(workdir / "results.csv")) == 3


# ---------------------------------------------------------------------------------------------
# Adaptive search logic with a fake trainer (fast: no JAX in the trials).
# ---------------------------------------------------------------------------------------------

FAKE_TRAINER = '''
import json, math, os, signal, sys, time
args = sys.argv[1:]
workdir = args[args.index("--workdir") + 1]
lr = float([a for a in args if a.startswith("--config.optim.lr=")][0].split("=", 1)[1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
  for step in range(1, 11):
    time.sleep(0.05)
    # The best learning rate is 10^-2.5; every step lowers the loss a little.
    loss = 2 + abs(math.log10(lr) + 2.5) + 1 / step
    f.write(json.dumps({"step": step, "val/loss": loss}) + "\\n")
    f.flush()
    if step == 3 and os.environ.get("FAKE_STOP_SWEEP") and not os.path.exists(
        os.environ["FAKE_STOP_SWEEP"]):
      open(os.environ["FAKE_STOP_SWEEP"], "w").close()  # Only the first trial does this.
      os.kill(os.getppid(), signal.SIGTERM)  # As if the sweep were preempted.
    if stop:
      break
  f.write(json.dumps({"step": step, "wall_time_sec": 0.5}) + "\\n")
'''


def fake_search(tmp_path, body):
  """A prepared sweep (a grid or an adaptive search) whose trials run the fake trainer above."""
  path = sweep_file(tmp_path, body)
  (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
  cfg = sweep.load_module(path).get_config()
  cfg.lock()
  plan = sweep.prepare(path, cfg, {})
  plan.trainer = [sys.executable, str(tmp_path / "fake_trainer.py")]
  return plan


def test_impossible_values_fail_their_trial_without_running_it(tmp_path):
  import optuna

  failed_keys = ["name", "overrides", "base_overrides", "status", "error", "attempts"]
  grid = fake_search(tmp_path, 'def get_sweep():\n  return [{"model.d_model": 30}]\n')
  with pytest.raises(JaxlmError, match="every trial failed"):
    sweep.run(grid, str(tmp_path / "grid"))
  saved = state(tmp_path / "grid" / "model.d_model=30")
  assert list(saved) == failed_keys and saved["status"] == "failed" and saved["attempts"] == 0
  assert "not divisible by model.n_head" in saved["error"]
  assert not (tmp_path / "grid" / "model.d_model=30" / "train.log").exists()  # Never started.

  search = fake_search(tmp_path, '''
      N_TRIALS = 1


      def get_search_space():
        return {"model.d_model": sweep.choice(30)}
      ''')
  workdir = tmp_path / "search"
  with pytest.raises(JaxlmError, match="every trial failed"):
    sweep.run(search, str(workdir))
  study = optuna.load_study(study_name="search", storage=f"sqlite:///{workdir}/study.db")
  (trial,) = study.get_trials()
  assert trial.state == optuna.trial.TrialState.FAIL
  saved = state(trial.user_attrs["trial_dir"])
  assert list(saved) == ["optuna_trial", *failed_keys] and saved["optuna_trial"] == 0
  assert saved["status"] == "failed" and saved["attempts"] == 0
  assert "not divisible by model.n_head" in saved["error"]
  assert trial.user_attrs["error"] == saved["error"]
  assert not os.path.exists(os.path.join(trial.user_attrs["trial_dir"], "train.log"))


# In-process, the sweep forks from this pytest process, where JAX's backend already runs threads;
# the `jaxlm sweep` process never starts a backend, so its forks are safe.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_search_prunes_trials_worse_than_the_median(tmp_path, monkeypatch):
  import optuna

  monkeypatch.setattr(sweep.pool, "_POLL_SEC", 0.01)
  plan = fake_search(tmp_path, '''
      N_TRIALS = 12
      SAMPLER = "random"
      PRUNER = "median"


      def get_search_space():
        return {"optim.lr": sweep.log_uniform(1e-5, 1e0)}
      ''')
  workdir = tmp_path / "search"
  rows = sweep.run(plan, str(workdir), parallel=2)

  study = optuna.load_study(study_name="search", storage=f"sqlite:///{workdir}/study.db")
  states = [t.state.name for t in study.get_trials()]
  assert len(states) == 12 and "PRUNED" in states and "COMPLETE" in states
  assert set(states) <= {"PRUNED", "COMPLETE"}
  assert {r["status"] for r in rows} <= {"done", "pruned"}
  # A trial started while the fifth was still running is judged only once that one completes,
  # which can be at its own last step: then it is pruned having run all 10. Trials started
  # later are judged at their first step, and SIGTERM stops them well before step 10.
  pruned_steps = [r["steps"] for r in rows if r["status"] == "pruned"]
  assert max(pruned_steps) <= 10 and min(pruned_steps) < 10, pruned_steps
  assert [r["status"] for r in rows].count("pruned") == states.count("PRUNED")
  best = study.best_trial
  assert rows[0]["final_val_loss"] == best.value
  # A second run finds the study full and runs nothing.
  assert len(sweep.run(plan, str(workdir), parallel=2)) == 12
  assert len(study.get_trials()) == 12


@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_interrupted_search_resumes_its_running_trial(tmp_path, monkeypatch):
  import optuna

  monkeypatch.setattr(sweep.pool, "_POLL_SEC", 0.01)
  monkeypatch.setenv("FAKE_STOP_SWEEP", str(tmp_path / "stopped"))
  plan = fake_search(tmp_path, '''
      N_TRIALS = 3
      PRUNER = "none"


      def get_search_space():
        return {"optim.lr": sweep.log_uniform(1e-4, 1e-2)}
      ''')
  workdir = tmp_path / "search"
  sweep.run(plan, str(workdir), parallel=1)  # Its first trial stops it (SIGTERM) at step 3.
  study = optuna.load_study(study_name="search", storage=f"sqlite:///{workdir}/study.db")
  (first,) = study.get_trials()
  assert first.state == optuna.trial.TrialState.RUNNING
  assert state(first.user_attrs["trial_dir"])["status"] == "interrupted"

  sweep.run(plan, str(workdir), parallel=1)
  trials = study.get_trials()
  assert [t.number for t in trials] == [0, 1, 2]  # Resumed, not asked again.
  assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
  assert state(first.user_attrs["trial_dir"])["attempts"] == 2
  assert [state(t.user_attrs["trial_dir"])["attempts"] for t in trials[1:]] == [1, 1]
  assert trials[0].params == first.params
