"""Bad input to scaling ladders: one line each, before anything runs; a ladder too small to fit
still runs and its summary says why the fit is skipped."""

import json
import os
import textwrap

import pytest
from conftest import CONFIGS, assert_one_line_error, run_jaxlm
from scaling_test import fake_ladder, smoke_cfg

from jaxlm import sweep
from jaxlm.errors import JaxlmError
from jaxlm.sweep import report

SMOKE = os.path.join(CONFIGS, "smoke.py")
HEADER = f'''
from jaxlm import sweep


def get_config():
  return sweep.load_experiment({SMOKE!r})
'''
XS = '{"model.d_model": 16, "model.n_head": 2}'
S = '{"model.d_model": 32, "model.n_head": 4}'

# (body of get_ladder(), fragments of the one error line)
BAD_LADDERS = {
    "sizes_not_a_dict": (f"return sweep.ladder([{XS}])",
                         ["ladder sizes must be a non-empty dict {name: {config key: value}}"]),
    "no_sizes": ("return sweep.ladder({})", ["ladder sizes must be a non-empty dict"]),
    "size_not_a_dict": ('return sweep.ladder({"xs": 16})',
                        ["ladder size 'xs': expected a non-empty dict of overrides"]),
    "size_name_not_a_string": (f"return sweep.ladder({{3: {XS}}})",
                               ["ladder size names must be non-empty strings, got 3"]),
    "unknown_key": ('return sweep.ladder({"xs": {"model.d_modl": 16}})',
                    ["ladder size 'xs': unknown config key model.d_modl",
                     "did you mean model.d_model?"]),
    "wrong_type": ('return sweep.ladder({"xs": {"model.d_model": "wide"}})',
                   ["ladder size 'xs': model.d_model must be int, got str 'wide'"]),
    "same_size_twice": (f'return sweep.ladder({{"a": {XS}, "b": {XS}}})',
                        ["ladder sizes 'a' and 'b' are the same overrides"]),
    "two_budget_kinds": (f'return sweep.ladder({{"xs": {XS}}}, steps=[10], tokens=[1000])',
                         ["a ladder takes one kind of budget, got steps and tokens"]),
    "zero_steps": (f'return sweep.ladder({{"xs": {XS}}}, steps=[10, 0])',
                   ["ladder steps= must be positive integers, got 0 in [10, 0]"]),
    "float_steps": (f'return sweep.ladder({{"xs": {XS}}}, steps=[10.5])',
                    ["ladder steps= must be positive integers, got 10.5"]),
    "empty_budgets": (f'return sweep.ladder({{"xs": {XS}}}, flops=[])',
                      ["ladder flops= must be a non-empty list of numbers"]),
    "repeated_budget": (f'return sweep.ladder({{"xs": {XS}}}, tokens=[1e4, 1e4])',
                        ["ladder tokens= lists a budget twice"]),
    "size_sets_steps": ('return sweep.ladder({"xs": {"model.d_model": 16, "train.steps": 5}}, '
                        'steps=[10])', ["ladder size 'xs' sets train.steps, but the ladder's "
                                        "steps= budgets set it: drop one"]),
    "budget_under_one_step": (f'return sweep.ladder({{"xs": {XS}}}, flops=[1e3])',
                              ["ladder size 'xs': a budget of 1000 flops is less than one step"]),
    "not_a_ladder": (f"return [{XS}]",
                     ["get_ladder() must return sweep.ladder({name: {overrides}}, ...), got list"]),
}


def ladder_file(tmp_path, body: str, extra: str = "") -> str:
  path = tmp_path / "bad_ladder.py"
  path.write_text(HEADER + f"\n\ndef get_ladder():\n  {body}\n" + textwrap.dedent(extra))
  return str(path)


@pytest.mark.parametrize("name", sorted(BAD_LADDERS))
def test_malformed_ladders_are_refused_naming_the_problem(tmp_path, name):
  body, fragments = BAD_LADDERS[name]
  path = ladder_file(tmp_path, body)
  cfg = sweep.load_module(path).get_config()
  cfg.lock()
  with pytest.raises(JaxlmError) as e:
    sweep.prepare(path, cfg, {})
  for fragment in fragments:
    assert fragment in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["unknown_key", "same_size_twice", "size_sets_steps"])
def test_malformed_ladder_is_one_line_error_and_the_workdir_is_untouched(tmp_path, name):
  body, fragments = BAD_LADDERS[name]
  workdir = tmp_path / "sw"
  proc = run_jaxlm("sweep", "--config", ladder_file(tmp_path, body), "--workdir", str(workdir))
  assert_one_line_error(proc, *fragments)
  assert not workdir.exists()


def test_a_sweep_file_declares_one_kind_of_sweep(tmp_path):
  path = ladder_file(tmp_path, f"return sweep.ladder({{'xs': {XS}}})",
                     extra=f"\n\ndef get_sweep():\n  return [{XS}]\n")
  cfg = sweep.load_module(path).get_config()
  cfg.lock()
  with pytest.raises(JaxlmError, match=r"or get_ladder\(\) \(a scaling ladder\), not "
                                       r"get_sweep\(\) and get_ladder\(\)"):
    sweep.prepare(path, cfg, {})
  with pytest.raises(JaxlmError, match="--n_trials is for adaptive searches"):
    sweep.prepare(ladder_file(tmp_path, f"return sweep.ladder({{'xs': {XS}}})"), cfg, {},
                  n_trials=3)


def test_a_ladder_of_two_sizes_summarises_and_says_why_there_is_no_fit(tmp_path):
  workdir = tmp_path / "sw"
  lad = sweep.ladder({"xs": {"model.d_model": 16, "model.n_head": 2},
                      "s": {"model.d_model": 32, "model.n_head": 4}})
  fake_ladder(workdir, lad, lambda counts, tokens: 3.0 - counts["total"] / 1e5)
  report.summarize(str(workdir))
  table = (workdir / "results.md").read_text()
  assert table.count("skipped: needs at least 3 distinct sizes finished at base steps for 3 "
                     "constants (E, A, alpha), got 2") == 2  # With and without embeddings.
  assert (workdir / "results.csv").exists()  # The rest of the summary is there.
  fits = json.loads((workdir / "scaling.json").read_text())["fits"]
  assert all("alpha" not in f and f["skipped"] for f in fits)


def test_a_failed_size_leaves_too_few_for_a_fit_and_the_summary_says_so(tmp_path):
  workdir = tmp_path / "sw"
  lad = sweep.ladder({f"d{d}": {"model.d_model": d, "model.n_head": 4} for d in (16, 32, 64)},
                     steps=[10, 20])
  fake_ladder(workdir, lad, lambda counts, tokens: 3.0 - counts["total"] / 1e6)
  for trial in workdir.iterdir():  # d64 failed at both budgets: it has no final loss.
    if trial.name.startswith("model.d_model=64"):
      state = json.loads((trial / "trial.json").read_text())
      (trial / "trial.json").write_text(json.dumps({**state, "status": "failed",
                                                    "error": "killed"}))
  report.summarize(str(workdir))
  table = (workdir / "results.md").read_text()
  assert "skipped: needs at least 3 distinct sizes finished at 10 steps" in table
  assert "got 2" in table
  assert "| d64 |" not in table  # A failed trial is not a point of the ladder.


def test_a_budget_ladder_needs_three_budgets_for_l_of_d_and_says_nothing_otherwise(tmp_path):
  # Two budgets: no L(D) row (not a fault), but L(N) at each budget.
  workdir = tmp_path / "sw"
  lad = sweep.ladder({f"d{d}": {"model.d_model": d, "model.n_head": 4} for d in (16, 32, 64)},
                     tokens=[1280, 2560])
  fake_ladder(workdir, lad, lambda c, d: 1.0 + 30 * c["total"]**-0.3 + 20 * d**-0.2)
  report.summarize(str(workdir))
  fits = json.loads((workdir / "scaling.json").read_text())["fits"]
  assert {f["law"] for f in fits} == {"L(N)"} and len(fits) == 4
  assert smoke_cfg().train.steps == 30  # The base config is never modified.
