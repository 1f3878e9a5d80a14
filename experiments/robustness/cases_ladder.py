"""Scaling ladders (issue 20): malformed ladders are one line before anything runs, and a ladder
too small to fit still runs, its summary saying why the fit is skipped."""

from __future__ import annotations

import os

from harness import SMOKE, Case, jaxlm

LADDER = "{W}.ladder.py"  # The sweep file, written beside the workdir by the case's prepare.
HEADER = f'''
from jaxlm import sweep


def get_config():
  c = sweep.load_experiment({SMOKE!r})
  c.train.steps = 4
  c.train.eval_every = 4
  c.train.eval_steps = 1
  c.checkpoint.every = 4
  return c


def get_ladder():
  return '''
XS = '{"model.d_model": 16, "model.n_head": 2}'
S = '{"model.d_model": 32, "model.n_head": 4}'


def write_ladder(body: str, earlier_sweep: bool = False):
  def prepare(workdir: str) -> None:
    with open(workdir + ".ladder.py", "w") as f:
      f.write(HEADER + body + "\n")
    if earlier_sweep:  # A workdir holding an earlier sweep's summary, which must survive.
      os.makedirs(workdir)
      for name in ("sweep.json", "results.md", "scaling.json"):
        with open(os.path.join(workdir, name), "w") as f:
          f.write(f"earlier {name}\n")
  return prepare


def untouched(workdir: str, result) -> str | None:
  return "workdir written" if os.path.exists(workdir) else None


def earlier_sweep_intact(workdir: str, result) -> str | None:
  for name in ("sweep.json", "results.md", "scaling.json"):
    with open(os.path.join(workdir, name)) as f:
      if f.read() != f"earlier {name}\n":
        return f"{name} changed"
  if sorted(os.listdir(workdir)) != ["results.md", "scaling.json", "sweep.json"]:
    return f"workdir now holds {sorted(os.listdir(workdir))}"
  return None


def fit_skipped(workdir: str, result) -> str | None:
  path = os.path.join(workdir, "results.md")
  if not os.path.exists(path):
    return "no results.md"
  with open(path) as f:
    table = f.read()
  if "skipped: needs at least 3 distinct sizes" not in table:
    return "results.md does not say why the fit is skipped"
  return None if os.path.exists(os.path.join(workdir, "scaling.json")) else "no scaling.json"


SWEEP = ["sweep", "--config", LADDER, "--workdir", "{W}"]
BAD = {
    "unknown key in a size": 'sweep.ladder({"xs": {"model.d_modl": 16}})',
    "a size given twice": f'sweep.ladder({{"a": {XS}, "b": {XS}}})',
    "two kinds of budget": f'sweep.ladder({{"xs": {XS}}}, steps=[10], tokens=[1000])',
    "non-positive steps": f'sweep.ladder({{"xs": {XS}}}, steps=[0])',
    "size sets train.steps beside budgets":
        'sweep.ladder({"xs": {"model.d_model": 16, "train.steps": 3}}, steps=[10])',
    "FLOP budget under one step": f'sweep.ladder({{"xs": {XS}}}, flops=[1e3])',
    "sizes not a dict": f"sweep.ladder([{XS}])",
}

CASES = [
    Case(f"ladder: {name}", 0, jaxlm(*SWEEP), prepare=write_ladder(body), check=untouched)
    for name, body in BAD.items()
] + [
    Case("ladder: malformed, an earlier sweep's workdir kept", 0, jaxlm(*SWEEP),
         prepare=write_ladder(BAD["a size given twice"], earlier_sweep=True),
         check=earlier_sweep_intact),
    Case("ladder: two sizes run, the fit says why it is skipped", 0,
         jaxlm(*SWEEP, "--parallel", "2"), expect_rc=(0,),
         prepare=write_ladder(f'sweep.ladder({{"xs": {XS}, "s": {S}}})'),
         expect_in_output=("scaling fit L(N) skipped: needs at least 3 distinct sizes",),
         check=fit_skipped, timeout=600.0),
]

