"""Items 3, 13, 16 and 18: one run per workdir, Ctrl-C and huge requests in sample, launch's
flags, SIGTERM before the loop, --tpu_jax quoting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from harness import JAXLM, SMOKE, Case, jaxlm, train_smoke, wait_for_line

SM = ["--config", "{SM}", "--workdir", "{W}"]
LONG = ["--config.train.steps=3000", "--config.train.eval_every=0",
        "--config.checkpoint.every=1000"]


def second_train(proc: subprocess.Popen, workdir: str) -> None:
  """While the case's train runs, a second one on the same workdir must be refused."""
  wait_for_line(proc, "compiled train step")
  second = subprocess.run([JAXLM, "train", "--config", SMOKE, "--workdir", workdir, *LONG],
                          capture_output=True, text=True, timeout=300)
  proc.send_signal(signal.SIGTERM)
  if second.returncode != 2 or "in use by another jaxlm train" not in second.stderr:
    raise RuntimeError(f"the second train was not refused (exit {second.returncode})")


def second_refused(workdir: str, result) -> str | None:
  if os.path.exists(os.path.join(workdir, "jaxlm.lock")):
    return "lock left behind"
  return None


def sigterm_at(fragment: str):
  def during(proc: subprocess.Popen, workdir: str) -> None:
    wait_for_line(proc, fragment)
    proc.send_signal(signal.SIGTERM)
  return during


def sigint_streaming(proc: subprocess.Popen, workdir: str) -> None:
  wait_for_line(proc, "sampling from")
  proc.stdout.read(50)
  proc.send_signal(signal.SIGINT)


def dead_lock(workdir: str) -> None:
  os.makedirs(workdir)
  child = subprocess.Popen(["true"])
  child.wait()
  import json
  import socket
  with open(os.path.join(workdir, "jaxlm.lock"), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": child.pid, "started": 0}, f)


def tpu_payload(workdir: str, result) -> str | None:
  return "the payload ran" if os.path.exists(os.path.join(workdir, "pwned")) else None


CASES = [
    Case("lock: second train on a running workdir", 3, jaxlm("train", *SM, *LONG),
         expect_rc=(0,), during=second_train, check=second_refused,
         expect_in_output=("stopped at step",)),
    Case("lock: stale lock of a dead process is taken over", 3,
         jaxlm("train", *SM, "--config.train.steps=2"), expect_rc=(0,), prepare=dead_lock,
         check=second_refused),
    Case("sample: ctrl-c while streaming", 13,
         jaxlm("sample", "--workdir", "{W}", "--max_new_tokens", "1000000"), expect_rc=(130,),
         prepare=train_smoke, during=sigint_streaming, expect_in_output=("jaxlm: interrupted",),
         max_error_lines=20),  # The text streamed so far stays printed before the one line.
    Case("sample: --max_new_tokens 2000000000", 13,
         jaxlm("sample", "--workdir", "{W}", "--max_new_tokens", "2000000000"),
         prepare=train_smoke, expect_in_output=("memory available",)),
    Case("launch --process_ids x", 16, jaxlm("launch", "--process_ids", "x", "--", "train")),
    Case("launch --coordinator notaport", 16,
         jaxlm("launch", "--coordinator", "notaport", "--", "train")),
    Case("train: SIGTERM during compile exits 0", 16, jaxlm("train", *SM), expect_rc=(0,),
         during=sigterm_at("optimizer group"), expect_in_output=("stopped at step",),
         check=second_refused),
    Case("tpu --tpu_jax payload stays quoted", 18,
         ["bash", "-c", f"{sys.executable} -m jaxlm.cli tpu up --dry_run --tpu_name=lm1 "
          "--tpu_zone=us-central2-b --tpu_accelerator=v4-8 --tpu_repo=https://e.com/j.git "
          "'--tpu_jax=jax[tpu]$(touch {W}/pwned)' | grep -F \"'jax[tpu]\\$(touch\""],
         expect_rc=(0,), prepare=os.makedirs, check=tpu_payload),
]
