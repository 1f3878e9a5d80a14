"""Items 7, 10, 8 and 2: records across a resume, the token cache's checksum, a full disk."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

from harness import JAXLM, SMOKE, Case, jaxlm, train_smoke

SM = ["--config", "{SM}", "--workdir", "{W}"]
ROOT = os.geteuid() == 0 and shutil.which("mount") is not None


def losses(workdir: str) -> list[tuple[int, float]]:
  recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], round(r["train/loss"], 5)) for r in recs if "train/loss" in r]


def each_step_once(workdir: str, result) -> str | None:
  recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  seen = [(r["step"], k) for r in recs for k in r if k != "step"]
  twice = sorted({x for x in seen if seen.count(x) > 1})
  samples = [line for line in open(os.path.join(workdir, "samples.txt"))
             if line.startswith("== step ")]
  if twice:
    return f"metrics.jsonl holds {twice[:3]} twice"
  return None if len(samples) == len(set(samples)) else "samples.txt holds a step twice"


def same_losses_as_uninterrupted(workdir: str, result) -> str | None:
  whole = workdir + "-whole"
  train_smoke(whole)
  try:
    if losses(workdir) != losses(whole):
      return f"train/loss {losses(workdir)} vs uninterrupted {losses(whole)}"
    return each_step_once(workdir, result)
  finally:
    shutil.rmtree(whole, ignore_errors=True)


def died_before_checkpoint_30(workdir: str) -> None:
  train_smoke(workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "30"))


def damaged_cache(workdir: str) -> None:
  train_smoke(workdir, f"--config.data.cache_dir={workdir}-cache")
  (path,) = glob.glob(os.path.join(workdir + "-cache", "*.bin"))
  with open(path, "r+b") as f:
    f.seek(4096)
    f.write(b"\xff" * 4096)


def small_disk(workdir: str) -> None:
  os.makedirs(workdir)
  if ROOT:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", workdir], check=True)


def kept_10_and_20(workdir: str, result) -> str | None:
  try:
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                   if s.isdigit())
    if ROOT and steps != [10, 20]:
      return f"checkpoints {steps}, expected [10, 20]"
    return None
  finally:
    if ROOT:
      subprocess.run(["umount", workdir], check=False)


# Without root (no tmpfs), a file-size limit makes writes fail the same way (EFBIG).
FULL = (jaxlm("train", *SM) if ROOT else
        ["bash", "-c", f"trap '' XFSZ; ulimit -f 400; exec {JAXLM} train --config {SMOKE} "
         "--workdir {W}"])

CASES = [
    Case("stop between log steps, resume: losses as uninterrupted", 7,
         jaxlm("train", *SM), expect_rc=(0,),
         prepare=lambda w: train_smoke(w, "--config.train.stop_at=12"),
         check=same_losses_as_uninterrupted),
    Case("resume after a death past the last checkpoint", 10,
         jaxlm("train", *SM), expect_rc=(0,), prepare=died_before_checkpoint_30,
         check=each_step_once),
    Case("rerun of a finished run writes nothing twice", 10,
         jaxlm("train", *SM), expect_rc=(0,), prepare=train_smoke, check=each_step_once),
    Case("token cache damaged in place is rebuilt", 8,
         jaxlm("train", "--config", "{SM}", "--workdir", "{W}-2",
               "--config.data.cache_dir={W}-cache"),
         expect_rc=(0,), prepare=damaged_cache, expect_in_output=("fails its checksum",)),
    Case("full disk during a save", 2, FULL, prepare=small_disk, check=kept_10_and_20,
         expect_in_output=("the run stopped",)),
]
