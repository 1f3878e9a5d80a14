"""Issue 20's bad μP input: one line each, before compile, the workdir untouched (item 0: these
are neighbours of issue 23's config cases, not its items)."""

from __future__ import annotations

import os

from harness import Case, jaxlm, train_smoke

SM = ["--config", "{SM}", "--workdir", "{W}", "--config.model.parametrization=mup"]


def nothing_written(workdir: str, result) -> str | None:
  return "workdir written" if os.path.exists(os.path.join(workdir, "config.json")) else None


def smoke_run_intact(workdir: str, result) -> str | None:
  """A refused mup config over a finished sp run leaves that run's config.json as it was."""
  text = open(os.path.join(workdir, "config.json")).read()
  return "config.json now says mup" if '"mup"' in text else None


CASES = [
    Case(f"mup {name}", 0, jaxlm("train", *SM, *flags), check=nothing_written,
         expect_in_output=(fragment,))
    for name, flags, fragment in [
        ("base width larger than the model", ["--config.model.mup_base_width=64"],
         "mup_base_width <= model.d_model=32"),
        ("base width missing", [], "needs 1 <= model.mup_base_width"),
        ("base width not divisible by n_head", ["--config.model.mup_base_width=6"],
         "is not divisible by model.n_head=4"),
        ("base head dim above the head dim", ["--config.model.mup_base_width=16",
                                              "--config.model.mup_base_head_dim=64"],
         "mup_base_head_dim=64 must be in [0, head_dim=8]"),
        ("with muon", ["--config.model.mup_base_width=16", "--config.optim.name=muon"],
         "μP has no rule for optimizer muon"),
        ("unknown parametrization", ["--config.model.parametrization=ntk"],
         "is not one of sp, mup"),
    ]
] + [
    Case("mup muon over a saved sp run", 0,
         jaxlm("train", *SM, "--config.model.mup_base_width=16", "--config.optim.name=muon"),
         prepare=train_smoke, check=smoke_run_intact,
         expect_in_output=("μP has no rule for optimizer muon",)),
]
