"""Issue 23, items 5, 6, 14 and part of 17: what a resume may change, the run's own tokenizer,
a damaged config.json, and hints that name the right cause.

One small trained run (2 steps of the smoke model on a corpus of its own) is made once per
module and copied into each test that changes it.
"""

import fnmatch
import json
import logging
import os
import shutil
import subprocess

import pytest
from conftest import CONFIGS, assert_one_line_error, jaxlm_script, load_config, run_jaxlm

from jaxlm import defaults, resume, runs, train
from jaxlm import params as params_lib
from jaxlm.errors import JaxlmError

SMOKE = os.path.join(CONFIGS, "smoke.py")
# Text with a 'z' (edits below replace it) and no '~': 1,876 characters, 56 distinct.
CORPUS = ("the lazy dog jumps over a quick brown fox; ZEBRAS graze in the hazy maze.\n"
          "Fourscore and seven years ago, 0123456789 (ok) [yes] {no}!?\n") * 14


def smoke(data_path: str, **overrides):
  cfg = load_config("smoke")
  cfg.data.path = data_path
  cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every = 2, 0, 0
  for key, value in overrides.items():
    section, name = key.split(".") if "." in key else (None, key)
    (cfg[section] if section else cfg)[name] = value
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run whose data.path is relative ("corpus.txt"), so that a copy of the run
  beside a copy of the corpus is the same run, and a test can edit its corpus in place."""
  root = tmp_path_factory.mktemp("trained")
  (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
  cwd = os.getcwd()
  os.chdir(root)
  try:
    train.train_and_evaluate(smoke("corpus.txt"), str(root / "run"))
  finally:
    os.chdir(cwd)
  return root


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
  """A copy of the trained run and its corpus, in the working directory: (workdir, corpus)."""
  shutil.copytree(trained / "run", tmp_path / "run")
  shutil.copy(trained / "corpus.txt", tmp_path / "corpus.txt")
  monkeypatch.chdir(tmp_path)
  return str(tmp_path / "run"), "corpus.txt"


def jaxlm_here(*args):
  """`jaxlm ARGS` from the working directory (run_jaxlm's is the repo's)."""
  return subprocess.run([jaxlm_script(), *args], capture_output=True, text=True, timeout=300)


def snapshot(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, workdir)] = open(p, "rb").read()
  return out


# --- 5. What a resume may change ----------------------------------------------------------------
def test_every_config_key_has_a_resume_policy():
  # A key no pattern names would be refused by default: each one must be a decision.
  keys = resume.flatten(defaults.base_config().to_dict())
  undecided = [k for k in keys if not any(
      fnmatch.fnmatchcase(k, p) for p, _, _ in resume.POLICY)]
  assert not undecided
  assert resume.policy("seed")[0] == resume.policy("train.batch_size")[0] == resume.REFUSE
  assert resume.policy("train.steps")[0] == resume.policy("optim.lr")[0] == resume.WARN
  assert resume.policy("train.eval_every")[0] == resume.ALLOW
  assert resume.policy("optim.groups.hidden.roles")[0] == resume.REFUSE
  assert resume.policy("optim.groups.hidden.lr_mult")[0] == resume.WARN
  assert resume.policy("a_key_from_the_future")[0] == resume.REFUSE


@pytest.mark.parametrize("overrides, message", [
    ({"seed": 5}, "seed=0 but the config says 5"),
    ({"train.batch_size": 16}, "train.batch_size=8 but the config says 16"),
    ({"train.dropout_rng": "hash"}, "train.dropout_rng='threefry2x32'"),
    ({"data.val_fraction": 0.2}, "data.val_fraction=0.1"),
    ({"optim.b2": 0.99}, "optim.b2=0.95"),
])
def test_a_resume_refuses_what_breaks_the_saved_state_and_changes_nothing(
    run, overrides, message):
  workdir, corpus = run
  before = snapshot(workdir)
  with pytest.raises(JaxlmError, match=message.replace("(", r"\(").replace("[", r"\[")):
    train.train_and_evaluate(smoke(corpus, **overrides), workdir)
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_accepted_changes_are_logged_once_each_and_kept_in_the_history(run, caplog):
  workdir, corpus = run
  history = resume.history(workdir)
  assert [r["event"] for r in history] == ["start"] and history[0]["seed"] == 0
  caplog.set_level(logging.INFO)
  result = train.train_and_evaluate(
      smoke(os.path.abspath(corpus), **{"train.steps": 4, "optim.lr": 1e-3,
                                        "train.log_every": 1}), workdir)
  assert result["step"] == 4
  lines = [r.getMessage() for r in caplog.records if "resume at step 2 changes" in
           r.getMessage()]
  # The corpus by another path (absolute), with the same bytes: accepted, and said so.
  assert len(lines) == 4, lines
  assert any("data.path" in line and "the same corpus (sha256)" in line for line in lines)
  assert any("train.steps: 2 -> 4" in line for line in lines)
  assert any("optim.lr: 0.003 -> 0.001" in line and "updates from here on" in line
             for line in lines)
  changes = {r["key"]: r for r in resume.history(workdir) if r["event"] == "change"}
  assert set(changes) == {"train.steps", "optim.lr", "train.log_every", "data.path"}
  assert changes["train.steps"]["old"] == 2 and changes["train.steps"]["new"] == 4
  assert all(r["step"] == 2 for r in changes.values())
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 4


def test_params_drift_is_measured_from_the_runs_first_seed(run):
  workdir, _ = run
  # What an older jaxlm left after a resume with --config.seed=5: config.json says 5.
  path = os.path.join(workdir, "config.json")
  cfg = json.load(open(path))
  cfg["seed"] = 5
  with open(path, "w") as f:
    json.dump(cfg, f)
  report = params_lib.run_report(workdir)
  assert report["seed"] == 0
  # Two steps of adamw at lr <= 3e-3 move no tensor by more than a few percent of its init;
  # against another seed's init every tensor is as far as a random draw (drift ~1.4).
  assert max(r["drift"] for r in report["tensors"] if r["drift"] is not None) < 0.2


# --- 6. The run's tokenizer is part of the run --------------------------------------------------
def test_a_corpus_edited_in_place_is_refused_in_one_line(run):
  workdir, corpus = run
  with open(corpus, encoding="utf-8") as f:
    text = f.read()
  with open(corpus, "w", encoding="utf-8") as f:
    f.write(text.replace("z", "~"))  # The same vocabulary size; every id after '~' shifts.
  before = snapshot(workdir)
  proc = jaxlm_here("train", "--config", SMOKE, "--workdir", workdir,
                    f"--config.data.path={corpus}", "--config.train.steps=4",
                    "--config.train.eval_every=0", "--config.checkpoint.every=0")
  assert_one_line_error(proc, "'~'", "tokenizer.json", "changed since the run started")
  assert snapshot(workdir) == before


def test_a_resume_encodes_an_edited_corpus_with_the_runs_tokenizer(run, caplog):
  workdir, corpus = run
  saved = runs.load_run(workdir).tokenizer
  with open(corpus, encoding="utf-8") as f:
    text = f.read()
  with open(corpus, "w", encoding="utf-8") as f:
    f.write(text.replace("z", "a"))  # 'z' gone: a vocabulary derived again would shift ids.
  cfg = smoke(corpus)
  prior = resume.open_run(workdir, cfg)
  caplog.set_level(logging.WARNING)
  dataset = resume.load_dataset(cfg, prior)
  assert dataset.tokenizer.to_json() == saved.to_json()
  assert dataset.tokenizer.vocab_size == 56
  assert any("changed since step 2" in r.getMessage() for r in caplog.records)
  # Evaluation reads it with the run's tokenizer too (it derived one from the corpus).
  assert runs.evaluate_run(workdir)["tokens"] > 0


# --- 14. A damaged config.json ------------------------------------------------------------------
def test_a_damaged_config_json_falls_back_to_the_checkpoints_copy(run):
  workdir, corpus = run
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write('{"model": {"n_layer": 2,')  # Cut short.
  for args in (["eval"], ["params"]):
    proc = jaxlm_here(*args, "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "config.json is damaged; using the config saved with checkpoint 2" in proc.stderr
  # A resume is checked against the checkpoint's config, and repairs the file.
  result = train.train_and_evaluate(smoke(corpus, **{"train.steps": 3}), workdir)
  assert result["step"] == 3
  assert json.load(open(path))["model"]["n_layer"] == 2


def test_a_damaged_config_json_without_a_checkpoint_is_one_line(run):
  workdir, _ = run
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("[1, 2]")  # JSON, but not a config.
  proc = run_jaxlm("eval", "--workdir", workdir)
  assert_one_line_error(proc, "config.json is damaged and no checkpoint holds a copy")


def test_a_damaged_tokenizer_json_falls_back_to_the_checkpoints_copy(run):
  workdir, _ = run
  with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
    f.write("{not json")
  assert runs.load_run(workdir).tokenizer.vocab_size == 56


# --- 17. Messages that name the right cause -----------------------------------------------------
def test_the_init_from_hint_is_offered_only_where_it_can_serve(run):
  workdir, corpus = run
  with pytest.raises(JaxlmError, match="model.n_layer=2") as e:
    train.train_and_evaluate(smoke(corpus, **{"model.n_layer": 3}), workdir)
  assert "--config.train.init_from" not in str(e.value)
  assert "do not fit that model" in str(e.value)
  with pytest.raises(JaxlmError, match="seed=0") as e:
    train.train_and_evaluate(smoke(corpus, seed=1), workdir)
  assert "--config.train.init_from" not in str(e.value)
  # Another dropout: the same params, so init_from can start it from these weights.
  with pytest.raises(JaxlmError, match=f"--config.train.init_from={workdir} to start"):
    train.train_and_evaluate(smoke(corpus, **{"model.dropout": 0.1}), workdir)


def test_a_config_file_without_get_config_says_so(tmp_path):
  path = tmp_path / "no_get_config.py"
  path.write_text("c = 1\n")
  proc = run_jaxlm("train", "--config", str(path), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(proc, "has no get_config()", str(path))
  path.write_text("def get_config():\n  raise ValueError('boom')\n")
  proc = run_jaxlm("train", "--config", str(path), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(proc, "get_config() raised ValueError: boom")
  path.write_text("def get_config():\n  return 5\n")
  proc = run_jaxlm("params", "--config", str(path))
  assert_one_line_error(proc, "returned int, not an ml_collections.ConfigDict")
  assert not os.path.exists(tmp_path / "w")
