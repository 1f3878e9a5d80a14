"""Items 1, 4 and 9: divergence, a refused resume, out-of-range optimizer values."""

from __future__ import annotations

import json
import math
import os

from harness import Case, jaxlm, train_smoke

SM = ["--config", "{SM}", "--workdir", "{W}"]


def finite_best(workdir: str, result) -> str | None:
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(ckpts) else []
  if not steps:
    return "no checkpoint kept"
  for step in steps:
    meta = json.load(open(os.path.join(ckpts, str(step), "meta", "metadata")))
    val = meta.get("val_loss") if isinstance(meta, dict) else None
    if val is not None and not math.isfinite(val):
      return f"step {step} saved with val loss {val}"
  return None


def config_says_adamw(workdir: str, result) -> str | None:
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  return None if cfg["optim"]["name"] == "adamw" else f"config.json says {cfg['optim']['name']}"


CASES = [
    Case("diverged run keeps only finite checkpoints", 1,
         jaxlm("train", *SM, "--config.train.log_every=10", "--config.checkpoint.every=3",
               "--config.train.eval_every=3", "--config.optim.lr=30",
               "--config.optim.warmup_steps=30", "--config.optim.grad_clip=0"),
         expect_rc=(1, 2), expect_in_output=("diverged at step",), check=finite_best),
    Case("refused resume leaves config.json alone", 4,
         jaxlm("train", *SM, "--config.optim.name=sgd", "--config.train.steps=40"),
         prepare=train_smoke, check=config_says_adamw),
] + [
    Case(f"out-of-range {flag}", 9, jaxlm("train", *SM, f"--config.{flag}"),
         check=lambda w, r: "workdir written" if os.path.exists(os.path.join(w, "config.json"))
         else None)
    for flag in ("optim.b1=1.5", "optim.weight_decay=-5", "optim.eps=-1", "optim.min_lr=1",
                 "optim.z_loss=-1", "optim.lr=nan", "checkpoint.every=-5", "checkpoint.keep=0")
]
