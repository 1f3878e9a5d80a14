"""The case format and runner behind experiments/robustness/run.py (see its README).

A case is one hostile thing a user does: a command (with {W} for a fresh workdir, {SM} for the
smoke config and {PY} for this Python), an optional `prepare(W)` that sets the scene (a trained
run, a damaged file), an optional `during(proc, W)` that acts on the running process (a signal, a
second process), and `check(W, result)` that says what is wrong with the state afterwards (None
when it is intact). A row reports the exit code, the lines the command printed, and whether the
state is intact; a case passes when all three match what it expects.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "smoke.py")
JAXLM = os.path.join(os.path.dirname(sys.executable), "jaxlm")


@dataclasses.dataclass
class Result:
  rc: int
  out: str  # stdout and stderr together, in order.

  @property
  def lines(self) -> list[str]:
    return self.out.splitlines()

  def error_lines(self) -> list[str]:
    return [line for line in self.lines if line.startswith("jaxlm: error:")]


@dataclasses.dataclass
class Case:
  name: str
  item: int  # The issue-23 item it reruns (0 for a neighbour found later).
  argv: list[str]
  expect_rc: tuple[int, ...] = (2,)
  # For an error: the command prints at most this many lines after the last log line
  # (absl's "I1202 ..." lines are progress, not the error) and no traceback.
  max_error_lines: int = 1
  prepare: Callable[[str], None] | None = None
  during: Callable[[subprocess.Popen, str], None] | None = None
  check: Callable[[str, Result], str | None] | None = None
  expect_in_output: tuple[str, ...] = ()
  timeout: float = 300.0
  env: dict[str, str] = dataclasses.field(default_factory=dict)


def jaxlm(*args: str) -> list[str]:
  return [JAXLM, *args]


def expand(argv: list[str], workdir: str) -> list[str]:
  return [a.replace("{W}", workdir).replace("{SM}", SMOKE).replace("{PY}", sys.executable)
          for a in argv]


def run_command(argv: list[str], workdir: str, *, timeout: float = 300.0,
                env: dict[str, str] | None = None,
                during: Callable[[subprocess.Popen, str], None] | None = None) -> Result:
  """Runs argv (expanded) in the repo root, capturing stdout and stderr together."""
  full_env = {**os.environ, **(env or {})}
  full_env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(expand(argv, workdir), cwd=REPO, env=full_env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
  lines: list[str] = []
  if during is not None:
    # The case reads the output itself (it waits for a line, then acts); what it read counts.
    proc.lines = lines  # type: ignore[attr-defined]
    during(proc, workdir)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    return Result(124, "".join(lines) + (out or ""))
  return Result(proc.returncode, "".join(lines) + (out or ""))


def wait_for_line(proc: subprocess.Popen, fragment: str, timeout: float = 120.0) -> str:
  """Reads proc's output until a line contains `fragment` (kept in proc.lines)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    proc.lines.append(line)  # type: ignore[attr-defined]
    if fragment in line:
      return line
  raise RuntimeError(f"never printed {fragment!r}")


def is_log_line(line: str) -> bool:
  """absl's log lines ("I1202 07:01:02.123 ...", W and E too) and warnings are not the error."""
  return (len(line) > 5 and line[0] in "IWEF" and line[1:5].isdigit()) or "Warning" in line


def error_tail(result: Result) -> list[str]:
  """The lines after the last log line: what the user reads as the command's answer."""
  lines = [line for line in result.lines if line.strip()]
  last_log = max((i for i, line in enumerate(lines) if is_log_line(line)), default=-1)
  return lines[last_log + 1:]


def run_case(case: Case) -> dict[str, Any]:
  tmp = tempfile.mkdtemp(prefix="robust-")
  workdir = os.path.join(tmp, "w")
  problems = []
  t0 = time.time()
  try:
    if case.prepare:
      case.prepare(workdir)
    result = run_command(case.argv, workdir, timeout=case.timeout, env=case.env,
                         during=case.during)
    if result.rc not in case.expect_rc:
      problems.append(f"exit {result.rc}, expected {case.expect_rc}")
    if "Traceback" in result.out:
      problems.append("traceback")
    tail = error_tail(result)
    if result.rc != 0 and len(tail) > case.max_error_lines:
      problems.append(f"{len(tail)} lines after the log")
    for fragment in case.expect_in_output:
      if fragment not in result.out:
        problems.append(f"no {fragment!r} in the output")
    state = case.check(workdir, result) if case.check else None
    if state:
      problems.append(state)
  except Exception as e:  # A case's own setup failing is a regression too.
    result, state = Result(-1, ""), None
    problems.append(f"{type(e).__name__}: {e}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"case": case.name, "item": case.item, "rc": result.rc, "lines": len(result.lines),
          "state": "intact" if not state else state, "ok": not problems,
          "why": "; ".join(problems), "sec": time.time() - t0,
          "tail": "\n".join(error_tail(result)[-3:])}


def train_smoke(workdir: str, *overrides: str) -> None:
  """A finished smoke run in workdir (the scene most cases start from)."""
  result = run_command(jaxlm("train", "--config", SMOKE, "--workdir", workdir, *overrides),
                       workdir)
  if result.rc != 0:
    raise RuntimeError(f"setup run failed ({result.rc}): {result.out[-500:]}")
