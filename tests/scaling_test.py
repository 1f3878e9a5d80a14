"""Scaling ladders: the fits recover known constants, and a ladder's summary end to end."""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
from conftest import CONFIGS, run_jaxlm

from jaxlm import sweep
from jaxlm.sweep import ladders, report

SMOKE = os.path.join(CONFIGS, "smoke.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HEADER = f'''
from jaxlm import sweep


def get_config():
  c = sweep.load_experiment({SMOKE!r})
  c.train.steps = 4
  c.train.eval_every = 4
  c.train.eval_steps = 1
  c.train.log_every = 2
  c.checkpoint.every = 4
  return c
'''


def ladder_file(tmp_path, body: str) -> str:
  path = tmp_path / "ladder_sweep.py"
  path.write_text(HEADER + textwrap.dedent(body))
  return str(path)


def smoke_cfg():
  cfg = sweep.load_experiment(SMOKE)
  cfg.lock()
  return cfg


# ---------------------------------------------------------------------------------------------
# The fits, on synthetic points.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("e, a, alpha, noise", [(1.7, 30.0, 0.3, 0.002), (0.9, 400.0, 0.55, 0.004),
                                                (2.5, 8.0, 0.12, 0.001)])
def test_power_law_fit_recovers_known_constants_within_its_uncertainty(e, a, alpha, noise):
  rng = np.random.default_rng(0)
  n = np.geomspace(2e4, 3e6, 12)
  loss = (e + a * n**-alpha) * (1 + noise * rng.standard_normal(len(n)))
  fit = sweep.fit_power_law(n, loss)
  assert fit.skipped is None and fit.n_points == 12
  for name, true in (("E", e), ("A", a), ("alpha", alpha)):
    err = fit.error(name)
    assert np.isfinite(err) and err > 0, (name, err)
    assert abs(fit[name] - true) <= 3 * err, (name, fit[name], true, err)
  # The fit is a real fit: a 10x smaller noise gives a tighter alpha.
  quiet = sweep.fit_power_law(n, (e + a * n**-alpha) * (1 + noise / 10 * rng.standard_normal(12)))
  assert quiet.error("alpha") < fit.error("alpha")


def test_power_law_fit_edge_cases():
  n = np.array([1e4, 1e5, 1e6])
  exact = sweep.fit_power_law(n, 1.5 + 20 * n**-0.3)  # Three points, three constants.
  assert exact["alpha"] == pytest.approx(0.3, rel=1e-3)
  assert all(np.isinf(e) for e in exact.errors)  # No residual degrees of freedom: unknown.
  two = sweep.fit_power_law(n[:2], [3.0, 2.5], "sizes")
  assert two.skipped == "needs at least 3 distinct sizes for 3 constants (E, A, alpha), got 2"
  assert sweep.fit_power_law([1e4, 1e4, 1e5], [3.0, 3.1, 2.5]).skipped  # 2 distinct sizes.


def test_fits_say_in_one_line_when_scipy_is_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "scipy.optimize", None)
  fit = sweep.fit_power_law([1e4, 1e5, 1e6, 1e7], [3.0, 2.5, 2.2, 2.1])
  assert fit.skipped.startswith("needs scipy, which is not installed: pip install")
  assert "\n" not in fit.skipped


def test_isoflop_parabola_and_frontier_recover_known_exponent():
  # L(N, D) = E + A/N^0.34 + B/D^0.28 at D = C / (6 N): its optimum N grows as C^(0.28/0.62).
  e, a, b, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
  budgets = [1e15, 1e16, 1e17, 1e18]
  optima = []
  for c in budgets:
    n = np.geomspace(1e5, 1e9, 15)
    loss = e + a * n**-alpha + b * (c / (6 * n))**-beta
    fit, n_opt = sweep.fit_parabola(n, loss)
    assert fit.skipped is None and n_opt is not None
    true_opt = n[np.argmin(loss)]
    assert true_opt / 3 < n_opt < true_opt * 3  # Within a grid step (15 points over 4 decades).
    optima.append(n_opt)
  line = sweep.fit_line_loglog(budgets, optima)
  assert line["a"] == pytest.approx(beta / (alpha + beta), abs=0.03)
  assert np.isfinite(line.error("a"))
  _, none = sweep.fit_parabola([1e5, 1e6, 1e7], [2.0, 2.5, 2.0])  # Opens downwards.
  assert none is None


# ---------------------------------------------------------------------------------------------
# Declaring a ladder.
# ---------------------------------------------------------------------------------------------

SIZES = {"xs": {"model.d_model": 16, "model.n_head": 2},
         "s": {"model.d_model": 32, "model.n_head": 4},
         "m": {"model.d_model": 64, "model.n_head": 4}}


def test_a_ladder_is_its_sizes_crossed_with_its_budgets():
  cfg = smoke_cfg()
  trials, points = ladders.plan(cfg, sweep.ladder(SIZES))
  assert trials == list(SIZES.values())
  assert [p["size"] for p in points] == ["xs", "s", "m"]
  trials, points = ladders.plan(cfg, sweep.ladder(SIZES, steps=[10, 20]))
  assert trials[:2] == [{**SIZES["xs"], "train.steps": 10}, {**SIZES["xs"], "train.steps": 20}]
  assert len(trials) == 6 and [p["budget"] for p in points[:2]] == [10, 20]
  # Tokens become steps at the base batch and block (8 x 16 = 128 tokens a step).
  trials, _ = ladders.plan(cfg, sweep.ladder(SIZES, tokens=[1280]))
  assert {t["train.steps"] for t in trials} == {10}
  # FLOP budgets become steps per size: a larger model gets fewer steps for the same budget.
  trials, points = ladders.plan(cfg, sweep.ladder(SIZES, flops=[1e10]))
  steps = [t["train.steps"] for t in trials]
  assert steps[0] > steps[1] > steps[2] >= 1
  for t in trials:
    counts = ladders.size_counts(sweep.resolve(cfg, t), 65)
    used = t["train.steps"] * counts["tokens_per_step"] * counts["flops_per_token"]
    assert used == pytest.approx(1e10, rel=0.2)


def test_size_counts_are_what_jaxlm_params_reports():
  from jaxlm.params import config_report
  cfg = sweep.resolve(smoke_cfg(), {"model.vocab_size": 65, **SIZES["m"]})
  counts = ladders.size_counts(cfg, 65)
  params = config_report(cfg, n_devices=1)["params"]
  assert counts["total"] == params["total"]
  assert counts["non_embedding"] == params["total"] - params["by_kind"]["embedding"]
  assert counts["matmul"] == params["matmul"]


# ---------------------------------------------------------------------------------------------
# The summary of a ladder, from trial directories written here (no training: fast).
# ---------------------------------------------------------------------------------------------

def fake_ladder(workdir, lad, loss_of):
  """A finished ladder sweep in `workdir`: sweep.json, and per trial its trial.json,
  config.json and metrics.jsonl, with the final val loss `loss_of(counts, tokens)`."""
  from jaxlm import config as config_lib
  cfg = smoke_cfg()
  trials, points = ladders.plan(cfg, lad)
  specs = sweep.plan_trials(cfg, trials)
  os.makedirs(workdir)
  record = ladders.record(lad, points, [s.name for s in specs])
  (workdir / "sweep.json").write_text(json.dumps({"config": "x", "base_overrides": {},
                                                  "ladder": json.loads(json.dumps(record))}))
  for spec in specs:
    resolved = sweep.resolve(cfg, {**spec.overrides, "model.vocab_size": 65})
    counts = ladders.size_counts(resolved, 65)
    tokens = spec.steps * counts["tokens_per_step"]
    trial = workdir / spec.name
    trial.mkdir()
    (trial / "config.json").write_text(json.dumps(
        config_lib.resolved_dict(resolved, config_lib.model_config(resolved, 65))))
    (trial / "trial.json").write_text(json.dumps(
        {"name": spec.name, "status": "done", "overrides": spec.overrides}))
    records = [{"step": 0, "val/loss": 4.17},
               {"step": spec.steps, "val/loss": loss_of(counts, tokens), "wall_time_sec": 1.0}]
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_ladder_summary_fits_l_of_n_and_l_of_d(tmp_path):
  sizes = {f"d{d}": {"model.d_model": d, "model.n_head": 4} for d in (16, 32, 48, 64, 96)}
  rng = np.random.default_rng(1)
  law = lambda c, d: float((1.2 + 60 * c["total"]**-0.4 + 30 * d**-0.3)
                           * (1 + 0.001 * rng.standard_normal()))
  workdir = tmp_path / "sw"
  fake_ladder(workdir, sweep.ladder(sizes, steps=[20, 40, 80]), law)
  report.summarize(str(workdir))
  out = json.loads((workdir / "scaling.json").read_text())
  assert len(out["points"]) == 15
  by_n = {(f["budget"], f["n"]): f for f in out["fits"] if f["law"] == "L(N)"}
  assert set(by_n) == {(b, n) for b in (20, 40, 80) for n in ("total", "non_embedding")}
  f = by_n[(80, "total")]
  # At a fixed D the law is E' + 60/N^0.4 with E' = 1.2 + 30/D^0.3.
  assert abs(f["alpha"] - 0.4) <= 3 * f["alpha_err"]
  by_d = [f for f in out["fits"] if f["law"] == "L(D)"]
  assert len(by_d) == 5 and all(f["n_points"] == 3 for f in by_d)  # Exact: no uncertainty.
  table = (workdir / "results.md").read_text()
  assert "## Scaling ladder" in table and "N without embeddings" in table
  assert "| L(N) = E + A / N^alpha | 80 steps, N with embeddings | 5 | E = " in table
  for name in ("scaling_loss_vs_n.png", "scaling_loss_vs_d.png"):
    assert (workdir / name).read_bytes()[:8] == PNG_MAGIC and f"]({name})" in table


def test_a_ladder_without_a_floor_also_reports_the_pure_power_law(tmp_path):
  # Losses whose log-log slope steepens with N (as experiments/scaling_ladder measured): no
  # floor in sight, so the free fit sits at E's bound and says so, and the E = 0 fit gives the
  # slope with a real uncertainty.
  sizes = {f"d{d}": {"model.d_model": d, "model.n_head": 4} for d in (16, 32, 48, 64, 96)}
  workdir = tmp_path / "sw"
  fake_ladder(workdir, sweep.ladder(sizes), lambda c, d: 3.5 - 0.02 * np.log(c["total"])**1.5)
  report.summarize(str(workdir))
  out = json.loads((workdir / "scaling.json").read_text())
  free = next(f for f in out["fits"] if f["law"] == "L(N)" and f["n"] == "total")
  assert free["E"] < 1e-6 and "E sits at its bound 0" in free["note"]
  pure = next(f for f in out["fits"] if f["law"] == "L(N), E = 0" and f["n"] == "total")
  n, loss = zip(*[(p["n_total"], p["loss"]) for p in out["points"]], strict=True)
  slope = np.polyfit(np.log(n), np.log(loss), 1)[0]
  assert pure["alpha"] == pytest.approx(-slope) and 0 < pure["alpha_err"] < pure["alpha"]
  assert "| L(N) = A / N^alpha (E = 0) | base steps, N with embeddings | 5 |" in (
      workdir / "results.md").read_text()


def test_isoflop_ladder_summary_finds_each_budgets_optimum(tmp_path):
  sizes = {f"d{d}": {"model.d_model": d, "model.n_head": 4} for d in (16, 32, 64, 128, 256)}
  law = lambda c, d: 1.0 + 40 * c["total"]**-0.35 + 60 * d**-0.35
  workdir = tmp_path / "sw"
  fake_ladder(workdir, sweep.ladder(sizes, flops=[3e10, 3e11]), law)
  report.summarize(str(workdir))
  fits = json.loads((workdir / "scaling.json").read_text())["fits"]
  iso = [f for f in fits if f["law"] == "isoflop"]
  assert len(iso) == 2 and all("n_opt" in f for f in iso)
  assert iso[1]["n_opt"] > iso[0]["n_opt"]  # More compute, a larger optimal model.
  frontier = next(f for f in fits if f["law"] == "N_opt(C)")
  assert 0.2 < frontier["a"] < 0.8 and frontier["n_points"] == 2
  assert (workdir / "scaling_isoflop.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# End to end: a tiny ladder of the smoke model, real `jaxlm train` trials.
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_size_ladder_runs_and_its_summary_says_why_the_fit_is_skipped(tmp_path):
  config = ladder_file(tmp_path, '''
      def get_ladder():
        return sweep.ladder({"xs": {"model.d_model": 16, "model.n_head": 2},
                             "s": {"model.d_model": 32, "model.n_head": 4}})
      ''')
  workdir = tmp_path / "sw"
  proc = run_jaxlm("sweep", "--config", config, "--workdir", str(workdir), "--parallel", "2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sweep: 2/2 done" in proc.stderr
  assert "a ladder of 2 size(s): its trials run, but fitting L(N)" in proc.stderr  # Said first.
  assert "scaling fit L(N) skipped: needs at least 3 distinct sizes" in proc.stderr
  out = json.loads((workdir / "scaling.json").read_text())
  points = sorted(out["points"], key=lambda p: p["n_total"])
  assert [p["size"] for p in points] == ["xs", "s"]
  for p in points:  # The N of each trial is the one its own run counted.
    log = (workdir / p["trial"] / "train.log").read_text()
    assert f"model: {p['n_total']:,} parameters" in log
    assert p["tokens"] == 4 * 8 * 16
  table = (workdir / "results.md").read_text()
  assert ("skipped: needs at least 3 distinct sizes finished at base steps for 3 constants "
          "(E, A, alpha), got 2") in table
  assert (workdir / "scaling_loss_vs_n.png").read_bytes()[:8] == PNG_MAGIC
  # --summarize rebuilds the ladder's summary from the workdir alone.
  (workdir / "scaling.json").unlink()
  proc = run_jaxlm("sweep", "--summarize", "--workdir", str(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((workdir / "scaling.json").read_text()) == out
