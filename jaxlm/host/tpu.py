"""Cloud TPU VMs: create a slice, run jaxlm on every worker, relaunch it after preemption.

tpu_types.py holds the accelerator catalog and commands.py builds the gcloud commands;
this module runs them and watches the run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from absl import logging

from jaxlm.errors import JaxlmError
from jaxlm.host import tpu_commands as commands

# ---------------------------------------------------------------------------------------------
# Running the commands.
# ---------------------------------------------------------------------------------------------

class Runner:
  """Runs commands, or in a dry run only prints each one, shell-quoted, on its own line."""

  def __init__(self, dry_run: bool = False):
    self.dry_run = dry_run

  def __call__(self, cmd: list[str], *, capture: bool = False, check: bool = True,
               quiet: bool = False) -> subprocess.CompletedProcess:
    line = shlex.join(cmd)
    if self.dry_run:
      print(line, flush=True)
      return subprocess.CompletedProcess(cmd, 0, "", "")
    (logging.debug if quiet else logging.info)("$ %s", line)
    proc = subprocess.run(cmd, capture_output=capture, text=True, check=False)
    if check and proc.returncode != 0:
      why = (proc.stderr or "").strip().splitlines()
      detail = why[-1] if why else "see its output above"
      short = line if len(line) <= 80 else line[:77] + "..."
      raise JaxlmError(f"`{short}` failed with exit code {proc.returncode}: {detail}")
    return proc


def vm_state(s: commands.Slice, run: Runner) -> str:
  """READY, PREEMPTED, ... as gcloud reports it; NOT_FOUND; UNKNOWN when gcloud failed."""
  proc = run(s.describe(), capture=True, check=False, quiet=True)
  if proc.returncode == 0:
    return proc.stdout.strip() or "UNKNOWN"
  if "NOT_FOUND" in proc.stderr or "not found" in proc.stderr.lower():
    return "NOT_FOUND"
  logging.warning("could not read the state of %s: %s", s.name,
                  (proc.stderr.strip().splitlines() or ["(no message)"])[-1])
  return "UNKNOWN"


def wait_until_active(s: commands.Slice, run: Runner, *, poll: float,
                      sleep: Callable[[float], None]) -> None:
  """Waits in the queue until the queued resource has its TPU VM."""
  last = None
  while True:
    state = run(s.queue_state(), capture=True, check=False, quiet=True).stdout.strip()
    if state == "ACTIVE" or run.dry_run:
      return
    if state in ("FAILED", "SUSPENDED"):
      raise JaxlmError(f"queued resource {s.name} is {state}; see `gcloud compute tpus "
                       f"queued-resources describe {s.name} --zone={s.zone}`")
    if state != last:
      logging.info("queued resource %s: %s", s.name, state or "(no state yet)")
      last = state
    sleep(poll)


def bring_up(s: commands.Slice, setup: commands.Setup, run: Runner, *, poll: float,
             sleep: Callable[[float], None]) -> None:
  """Creates the slice (waiting in the queue if queued), then sets up every worker."""
  acc = s.accelerator
  logging.info("creating %s: %s (%d host%s x %d chips) in %s%s", s.name, acc.name, acc.hosts,
               "s" * (acc.hosts > 1), acc.chips_per_host, s.zone,
               " as a Spot VM" if s.spot else " as a preemptible VM" if s.preemptible else "")
  run(s.create())
  if s.queued:
    wait_until_active(s, run, poll=poll, sleep=sleep)
  set_up(s, setup, run)


def set_up(s: commands.Slice, setup: commands.Setup, run: Runner) -> None:
  if not setup.repo_url and not run.dry_run:
    dirty = subprocess.run(["git", "-C", setup.repo_dir, "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True, check=False)
    if dirty.stdout.strip():
      logging.warning("uncommitted changes in %s are not copied: the workers get HEAD",
                      setup.repo_dir)
  try:
    for cmd in commands.setup_commands(s, setup):
      run(cmd)
  finally:
    if not setup.repo_url and not run.dry_run and os.path.exists(setup.tarball(s.name)):
      os.remove(setup.tarball(s.name))


def start(s: commands.Slice, argv: Sequence[str], run: Runner) -> None:
  logging.info("starting `jaxlm %s` on %d worker%s", shlex.join(argv), s.hosts,
               "s" * (s.hosts > 1))
  run(commands.start_command(s, argv))


def watch(s: commands.Slice, argv: Sequence[str], setup: commands.Setup, run: Runner, *,
          poll: float, max_retries: int, down_when_done: bool,
          sleep: Callable[[float], None] = time.sleep) -> None:
  """Launches the run and keeps it going: recreates a lost slice, restarts a dead run.

  Every relaunch runs the same command, which resumes from the last checkpoint in the
  (gs://) workdir. Gives up with an error after `max_retries` relaunches.
  """
  if run.dry_run:  # What a launch on a slice that does not exist yet runs, and one poll.
    run(s.describe())
    bring_up(s, setup, run, poll=poll, sleep=sleep)
    start(s, argv, run)
    run(s.describe())
    run(commands.probe_command(s))
    return

  workdir = commands.workdir_of(argv) or ""
  if not workdir.startswith("gs://"):
    logging.warning("--workdir %s lives on the VM: if the slice is lost, the relaunch starts "
                    "from scratch (use a gs:// workdir to resume)", workdir)
  logging.info("watching %s in %s: a check every %gs, at most %d relaunch%s", s.name, s.zone,
               poll, max_retries, "es" * (max_retries != 1))

  state = vm_state(s, run)
  if state not in ("READY", *commands.LOST):
    raise JaxlmError(f"{s.name} is {state}: run watch again once it is READY (or delete it "
                     "with jaxlm tpu down)")
  status = "none"
  if state == "READY":
    probe = run(commands.probe_command(s), capture=True, check=False, quiet=True)
    status = commands.job_status(probe.stdout)
    if status == "unknown":  # Setting up again under a live run would pull the rug from it.
      raise JaxlmError(f"could not reach worker 0 of {s.name} over ssh to see whether a run "
                       "is going; try again")
  if status == "running":
    logging.info("%s is READY and its run is going: watching it", s.name)
  elif status == "finished":
    logging.info("%s: the run has already finished", s.name)
    _finish(s, run, down_when_done)
    return
  else:
    if state in ("PREEMPTED", "TERMINATED"):
      logging.info("%s is %s: deleting it first", s.name, state)
      run(s.delete(), check=False)
    if state == "READY":
      set_up(s, setup, run)
    else:
      bring_up(s, setup, run, poll=poll, sleep=sleep)
    start(s, argv, run)

  relaunches = 0
  ready = True  # The workers have the code and their environment.
  last_state, last_status = state, status
  while True:
    sleep(poll)
    state = vm_state(s, run)
    if state != last_state:
      logging.info("%s is %s", s.name, state)
      last_state = state
    if state in commands.LOST:
      problem, recreate = f"{s.name} is {state}", True
    elif state == "READY":
      seen = last_status
      probe = run(commands.probe_command(s), capture=True, check=False, quiet=True)
      last_status = commands.job_status(probe.stdout)
      if last_status in ("running", "unknown"):
        continue
      if last_status == "finished":
        logging.info("%s: the run finished after %d relaunch%s", s.name, relaunches,
                     "es" * (relaunches != 1))
        _finish(s, run, down_when_done)
        return
      if last_status == "stopped" and seen != "stopped":
        # A signal stopped it: most likely a preemption notice, and the slice will say so soon.
        logging.info("%s: the run was stopped by a signal; checking the slice once more", s.name)
        continue
      problem, recreate = ("the run on worker 0 was stopped by a signal" if last_status ==
                           "stopped" else "the run on worker 0 died before its final done: "
                           "line"), False
    else:
      continue  # CREATING, RESTARTING, REPAIRING...: wait for it to settle.

    if relaunches >= max_retries:
      raise JaxlmError(f"gave up after {max_retries} relaunch{'es' * (max_retries != 1)}: "
                       f"{problem}; the workdir keeps the last checkpoint (jaxlm tpu down "
                       f"--tpu_name={s.name} --tpu_zone={s.zone} deletes the slice)")
    relaunches += 1
    last_status = "none"
    logging.warning("%s: relaunch %d of %d", problem, relaunches, max_retries)
    try:
      if recreate:
        ready = False
        run(s.delete(), check=False)
        bring_up(s, setup, run, poll=poll, sleep=sleep)
      else:
        run(commands.stop_command(s, "KILL"))  # Peers of a dead process may hang on; clear them.
        if not ready:
          set_up(s, setup, run)
      ready = True
      start(s, argv, run)
    except JaxlmError as e:
      logging.warning("relaunch %d failed: %s", relaunches, e)  # The next poll tries again.


def _finish(s: commands.Slice, run: Runner, down_when_done: bool) -> None:
  if down_when_done:
    logging.info("deleting %s (--tpu_down_when_done)", s.name)
    run(s.delete())
  else:
    logging.info("the slice keeps running (and costing): jaxlm tpu down --tpu_name=%s "
                 "--tpu_zone=%s%s", s.name, s.zone, " --tpu_queued" * s.queued)


# ---------------------------------------------------------------------------------------------
# The `jaxlm tpu VERB` entry point.
# ---------------------------------------------------------------------------------------------

VERBS = ("up", "run", "logs", "stop", "down", "watch")


def repo_root() -> str:
  """The checkout this jaxlm was imported from (this file is jaxlm/host/tpu.py in it)."""
  import jaxlm
  return os.path.dirname(os.path.dirname(os.path.abspath(jaxlm.__file__)))


def main(verb: str, argv: Sequence[str], *, name: str | None, zone: str | None,
         accelerator: str | None, version: str = "", spot: bool = False,
         preemptible: bool = False, queued: bool = False, repo_url: str = "",
         jax: str = "jax[tpu]", check_zone: bool = True, poll: float = 60.0,
         max_retries: int = 5, down_when_done: bool = False, dry_run: bool = False) -> None:
  """`jaxlm tpu VERB [flags] [-- COMMAND]`: see experiments/tpu/README.md."""
  if verb not in VERBS:
    raise JaxlmError(f"unknown tpu verb {verb!r}: use one of {', '.join(VERBS)}, e.g. jaxlm "
                     "tpu up --tpu_name=lm1 --tpu_zone=us-central2-b --tpu_accelerator=v4-8")
  needs_shape = verb in ("up", "run", "watch")
  if needs_shape and not accelerator:
    raise JaxlmError(f"tpu {verb} needs --tpu_accelerator, e.g. v4-8 or v5litepod-16")
  s = commands.make_slice(name, zone, accelerator if needs_shape else None, version=version,
                          spot=spot, preemptible=preemptible, queued=queued,
                          check_zone=check_zone)
  if verb in ("run", "watch"):
    commands.check_command(s, argv)
    if verb == "watch" and argv[0] != "train":
      raise JaxlmError("tpu watch relaunches `train` runs (it knows when they are done); "
                       f"got {argv[0]!r}")
  elif argv:
    raise JaxlmError(f"tpu {verb} takes no command after --, got {shlex.join(argv)!r}")
  if max_retries < 0:
    raise JaxlmError(f"--tpu_max_retries must be >= 0, got {max_retries}")
  setup = commands.Setup(repo_root(), repo_url, jax)
  if verb in ("up", "watch") and not repo_url and not os.path.exists(
      os.path.join(setup.repo_dir, ".git")):
    raise JaxlmError(f"{setup.repo_dir} is not a git checkout, so there is no HEAD to copy to "
                     "the workers: give --tpu_repo=URL to have them clone it")
  if not dry_run and shutil.which("gcloud") is None:
    raise JaxlmError("gcloud is not on PATH: install the Google Cloud CLI "
                     "(https://cloud.google.com/sdk/docs/install) and run `gcloud init`, or "
                     "add --dry_run to print the commands")

  run = Runner(dry_run)
  if verb == "up":
    bring_up(s, setup, run, poll=poll, sleep=time.sleep)
    if not dry_run:
      logging.info("%s is ready: jaxlm tpu run --tpu_name=%s --tpu_zone=%s --tpu_accelerator=%s "
                   "-- train ...", s.name, s.name, s.zone, s.accelerator.name)
  elif verb == "run":
    start(s, argv, run)
    _follow(s, run)
  elif verb == "logs":
    _follow(s, run)
  elif verb == "stop":
    run(commands.stop_command(s))
  elif verb == "down":
    run(s.delete())
  else:
    watch(s, argv, setup, run, poll=poll, max_retries=max_retries,
          down_when_done=down_when_done)


def _follow(s: commands.Slice, run: Runner) -> None:
  if not run.dry_run:
    logging.info("following worker 0's log; Ctrl-C stops following, not the run (jaxlm tpu "
                 "stop ends it with a checkpoint)")
    sys.stderr.flush()
  run(commands.follow_command(s))
