"""Cloud TPU VMs: create a slice, run jaxlm on every worker, relaunch it after preemption."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from absl import logging

from jaxlm.errors import JaxlmError

# ---------------------------------------------------------------------------------------------
# Accelerator types: a snapshot of Google's public Cloud TPU docs (the pages "TPU regions and
# zones", "TPU software versions" and each generation's architecture page), mid-2025. Google
# adds zones and slice sizes over time: --notpu_check_zone skips the zone check and
# --tpu_version overrides the runtime version when this table has gone stale.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One slice shape: gcloud's --accelerator-type, its chips and its hosts (gcloud's workers)."""
  name: str
  generation: str  # v2 | v3 | v4 | v5e | v5p | v6e
  chips: int
  hosts: int

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def runtime_version(self) -> str:
    return RUNTIME_VERSIONS[self.generation]

  @property
  def zones(self) -> tuple[str, ...]:
    return ZONES.get(self.name) or ZONES[self.generation]


def _named_by_cores(generation: str, sizes: Sequence[int]) -> dict[str, Accelerator]:
  # v2, v3, v4 and v5p names count TensorCores (two per chip); each host drives four chips.
  return {f"{generation}-{n}": Accelerator(f"{generation}-{n}", generation, n // 2,
                                           max(1, n // 8)) for n in sizes}


def _named_by_chips(prefix: str, generation: str, sizes: Sequence[int]) -> dict[str, Accelerator]:
  # v5e (called v5litepod) and v6e names count chips: slices of up to 8 chips are one host,
  # larger slices have four chips per host.
  return {f"{prefix}-{n}": Accelerator(f"{prefix}-{n}", generation, n, 1 if n <= 8 else n // 4)
          for n in sizes}


ACCELERATORS: dict[str, Accelerator] = {
    **_named_by_cores("v2", (8, 32, 128, 256, 512)),
    **_named_by_cores("v3", (8, 32, 64, 128, 256, 512, 1024, 2048)),
    **_named_by_cores("v4", (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    **_named_by_chips("v5litepod", "v5e", (1, 4, 8, 16, 32, 64, 128, 256)),
    **_named_by_cores("v5p", (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)),
    **_named_by_chips("v6e", "v6e", (1, 4, 8, 16, 32, 64, 128, 256)),
}

# The runtime (software) version Google recommends for JAX on each generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Zones offering each generation; an exact type name overrides its generation (v2 and v3
# single-host slices are offered in more zones than their pods).
ZONES = {
    "v2-8": ("us-central1-b", "us-central1-c", "europe-west4-a", "asia-east1-c"),
    "v2": ("us-central1-a", "europe-west4-a"),
    "v3-8": ("us-central1-a", "us-central1-b", "europe-west4-a"),
    "v3": ("europe-west4-a",),
    "v4": ("us-central2-b",),
    "v5e": ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a", "europe-west4-b",
            "asia-southeast1-b"),
    "v5p": ("us-central1-a", "us-east5-a", "europe-west4-b"),
    "v6e": ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "europe-west4-a",
            "asia-northeast1-b"),
}


def find_accelerator(name: str) -> Accelerator:
  """The table entry for `name`, or a one-line error listing the known sizes of its family."""
  if name in ACCELERATORS:
    return ACCELERATORS[name]
  family = name.rsplit("-", 1)[0]
  family = "v5litepod" if family == "v5e" else family  # gcloud's name for v5e slices.
  same = [k for k in ACCELERATORS if k.rsplit("-", 1)[0] == family]
  if same:
    known = f"known {family} types: {', '.join(same)}"
  else:
    families = dict.fromkeys(k.rsplit("-", 1)[0] for k in ACCELERATORS)
    known = f"known families: {', '.join(families)} (e.g. v4-8, v5litepod-16, v6e-8)"
  raise JaxlmError(f"unknown TPU accelerator type {name!r}; {known}")


# ---------------------------------------------------------------------------------------------
# The slice and the commands that manage it. Everything here only builds argv lists.
# ---------------------------------------------------------------------------------------------

# GCP resource names: lowercase letters, digits and hyphens, starting with a letter.
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")

# Where things live on each worker (paths relative to the remote home directory).
CODE = "~/jaxlm"
VENV = "~/jaxlm-venv"
LOG = "~/jaxlm-run.log"
PID = "~/jaxlm-run.pid"
# Current JAX releases need a newer Python than the 3.10 of the Ubuntu 22.04 TPU images, so the
# workers get a uv-managed interpreter of this version.
PYTHON = "3.12"

# States after which the slice has to be deleted and created again (NOT_FOUND: it is gone).
LOST = ("PREEMPTED", "TERMINATED", "NOT_FOUND")


def _tpus(*args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", *args]


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU VM (one slice of one or more hosts) as gcloud knows it."""
  name: str
  zone: str
  accelerator: Accelerator | None  # Needed to create the slice, not to reach it.
  version: str = ""
  spot: bool = False
  preemptible: bool = False
  queued: bool = False  # Created through a queued resource of the same name.

  @property
  def hosts(self) -> int:
    return self.accelerator.hosts if self.accelerator else 1

  def create(self) -> list[str]:
    acc = self.accelerator
    if self.queued:
      cmd = _tpus("queued-resources", "create", self.name, f"--node-id={self.name}",
                  f"--zone={self.zone}", f"--accelerator-type={acc.name}",
                  f"--runtime-version={self.version}")
    else:
      cmd = _tpus("tpu-vm", "create", self.name, f"--zone={self.zone}",
                  f"--accelerator-type={acc.name}", f"--version={self.version}")
    return cmd + ["--spot"] * self.spot + ["--preemptible"] * self.preemptible

  def queue_state(self) -> list[str]:
    return _tpus("queued-resources", "describe", self.name, f"--zone={self.zone}",
                 "--format=value(state.state)")

  def describe(self) -> list[str]:
    return _tpus("tpu-vm", "describe", self.name, f"--zone={self.zone}",
                 "--format=value(state)")

  def delete(self) -> list[str]:
    if self.queued:  # --force deletes the node too.
      return _tpus("queued-resources", "delete", self.name, f"--zone={self.zone}",
                   "--force", "--quiet")
    return _tpus("tpu-vm", "delete", self.name, f"--zone={self.zone}", "--quiet")

  def ssh(self, script: str, worker: str = "all") -> list[str]:
    return _tpus("tpu-vm", "ssh", self.name, f"--zone={self.zone}", f"--worker={worker}",
                 "--command", script)

  def scp(self, local: str, remote: str) -> list[str]:
    return _tpus("tpu-vm", "scp", local, f"{self.name}:{remote}", f"--zone={self.zone}",
                 "--worker=all")


def make_slice(name: str | None, zone: str | None, accelerator: str | None = None, *,
               version: str = "", spot: bool = False, preemptible: bool = False,
               queued: bool = False, check_zone: bool = True) -> Slice:
  """Validates the user's choices (one-line errors) and returns the slice they describe."""
  if not name:
    raise JaxlmError("--tpu_name is required (the TPU VM to create or use)")
  if not _NAME.fullmatch(name):
    raise JaxlmError(f"--tpu_name={name!r} is not a valid TPU name: use lowercase letters, "
                     "digits and hyphens, starting with a letter (at most 63 characters)")
  if not zone:
    raise JaxlmError("--tpu_zone is required, e.g. --tpu_zone=us-central2-b")
  if spot and preemptible:
    raise JaxlmError("choose one of --tpu_spot and --tpu_preemptible (Spot VMs are the newer "
                     "kind, without a 24-hour limit)")
  if queued and preemptible:
    raise JaxlmError("queued resources take --tpu_spot, not --tpu_preemptible")
  acc = find_accelerator(accelerator) if accelerator else None
  if acc and check_zone and zone not in acc.zones:
    raise JaxlmError(f"{acc.name} is not offered in {zone}; {acc.generation} slices of this "
                     f"size are offered in {', '.join(acc.zones)} (a snapshot of Google's docs: "
                     "--notpu_check_zone skips this check)")
  return Slice(name, zone, acc, version or (acc.runtime_version if acc else ""), spot,
               preemptible, queued)


@dataclasses.dataclass(frozen=True)
class Setup:
  """How each worker gets the code and a Python environment with JAX for TPUs."""
  repo_dir: str  # This checkout: its committed HEAD is copied when there is no repo_url.
  repo_url: str = ""  # A git URL every worker clones instead.
  jax: str = "jax[tpu]"  # The pip requirement for JAX.
  tmp_dir: str = ""  # Where the local tarball of HEAD is written (default: the temp dir).

  def tarball(self, name: str) -> str:
    return os.path.join(self.tmp_dir or tempfile.gettempdir(), f"jaxlm-{name}.tar.gz")


def setup_commands(s: Slice, setup: Setup) -> list[list[str]]:
  """Copies the code to every worker and installs it with JAX into a fresh virtualenv there."""
  if setup.repo_url:
    ship = [s.ssh(f"rm -rf {CODE} && git clone --depth=1 {shlex.quote(setup.repo_url)} {CODE}")]
  else:
    tarball = setup.tarball(s.name)
    ship = [["git", "-C", setup.repo_dir, "archive", "--format=tar.gz", f"--output={tarball}",
             "HEAD"],
            s.scp(tarball, "jaxlm.tar.gz"),
            s.ssh(f"rm -rf {CODE} && mkdir -p {CODE} && tar -xzf ~/jaxlm.tar.gz -C {CODE} "
                  "&& rm ~/jaxlm.tar.gz")]
  uv = "~/.local/bin/uv"
  jax = '"' + setup.jax.replace('"', "") + '"'  # Double quotes keep brackets from the shell.
  code = '"' + CODE.replace("~", "$HOME") + '[gcs]"'  # The gcs extra: gs:// workdirs.
  install = (f"python3 -m pip install --user --quiet uv && rm -rf {VENV} && "
             f"{uv} venv --quiet --python {PYTHON} {VENV} && "
             f"{uv} pip install --quiet --python {VENV}/bin/python {code} {jax}")
  return ship + [s.ssh(install)]


def start_command(s: Slice, argv: Sequence[str]) -> list[str]:
  """Starts `jaxlm ARGV` in the background on every worker at once, logging to LOG there."""
  # Multi-host slices: every worker joins one JAX cluster (see jaxlm/host/distributed.py).
  env = "JAXLM_DISTRIBUTED=1 " if s.hosts > 1 else ""
  script = (f"cd {CODE} || exit 1; "
            f'if kill -0 "$(cat {PID} 2>/dev/null)" 2>/dev/null; then '
            'echo "jaxlm: a run is still going on $(hostname)" >&2; exit 1; fi; '
            f"{env}nohup {VENV}/bin/python -m jaxlm.cli {shlex.join(argv)} "
            f"> {LOG} 2>&1 < /dev/null & echo $! > {PID}")
  return s.ssh(script)


def follow_command(s: Slice) -> list[str]:
  """Prints worker 0's log from the start and follows it until its run exits."""
  return s.ssh(f'test -f {LOG} || {{ echo "jaxlm: no run was started on $(hostname)" >&2; '
               f'exit 1; }}; tail --pid="$(cat {PID})" -n +1 -F {LOG}', worker="0")


def probe_command(s: Slice) -> list[str]:
  """Worker 0's run: `running`, or `exited` and its last stop/done log lines."""
  return s.ssh(f'if kill -0 "$(cat {PID} 2>/dev/null)" 2>/dev/null; then echo running; '
               f'else echo exited; grep -E "stopped at step|done: " {LOG} 2>/dev/null '
               "| tail -n 2; fi", worker="0")


def stop_command(s: Slice, signal: str = "TERM") -> list[str]:
  """Signals the run on every worker; TERM makes it checkpoint and exit (see train.py)."""
  return s.ssh(f'p="$(cat {PID} 2>/dev/null)"; if [ -n "$p" ] && kill -{signal} "$p" '
               f'2>/dev/null; then echo "jaxlm: sent SIG{signal} to the run on $(hostname)"; '
               'while kill -0 "$p" 2>/dev/null; do sleep 1; done; fi; true')


def job_status(probe_output: str) -> str:
  """`running`, `finished` (exited after its final done: line), `stopped` (by a signal, with a
  checkpoint), `died`, or `unknown` (no answer)."""
  lines = [line.strip() for line in probe_output.splitlines()]
  if "running" in lines:
    return "running"
  if "exited" not in lines:
    return "unknown"  # The ssh itself failed; the next poll tells.
  rest = lines[lines.index("exited") + 1:]
  # A run stopped by a signal (a preemption notice) also logs done:, after "stopped at step";
  # one stopped by train.stop_at has reached the step it was asked to.
  if any("stopped at step" in line and "train.stop_at" not in line for line in rest):
    return "stopped"
  return "finished" if any("done: " in line for line in rest) else "died"


def workdir_of(argv: Sequence[str]) -> str | None:
  """The value of --workdir in a jaxlm command line, if any."""
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_command(s: Slice, argv: Sequence[str]) -> None:
  """The jaxlm command after `--` must be something the workers can share."""
  if not argv:
    raise JaxlmError("give the jaxlm command to run after --, e.g. jaxlm tpu run ... -- train "
                     "--config configs/shakespeare_char.py --workdir gs://BUCKET/run")
  workdir = workdir_of(argv)
  if argv[0] == "train" and not workdir:
    raise JaxlmError("the train command needs --workdir (a gs:// path, so that it outlives "
                     "the VM)")
  if workdir and s.hosts > 1 and not workdir.startswith("gs://"):
    raise JaxlmError(f"--workdir {workdir} is local to each worker, and the {s.hosts} workers "
                     f"of {s.accelerator.name} cannot share it: use a gs:// workdir")


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


def vm_state(s: Slice, run: Runner) -> str:
  """READY, PREEMPTED, ... as gcloud reports it; NOT_FOUND; UNKNOWN when gcloud failed."""
  proc = run(s.describe(), capture=True, check=False, quiet=True)
  if proc.returncode == 0:
    return proc.stdout.strip() or "UNKNOWN"
  if "NOT_FOUND" in proc.stderr or "not found" in proc.stderr.lower():
    return "NOT_FOUND"
  logging.warning("could not read the state of %s: %s", s.name,
                  (proc.stderr.strip().splitlines() or ["(no message)"])[-1])
  return "UNKNOWN"


def wait_until_active(s: Slice, run: Runner, *, poll: float,
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


def bring_up(s: Slice, setup: Setup, run: Runner, *, poll: float,
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


def set_up(s: Slice, setup: Setup, run: Runner) -> None:
  if not setup.repo_url and not run.dry_run:
    dirty = subprocess.run(["git", "-C", setup.repo_dir, "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True, check=False)
    if dirty.stdout.strip():
      logging.warning("uncommitted changes in %s are not copied: the workers get HEAD",
                      setup.repo_dir)
  try:
    for cmd in setup_commands(s, setup):
      run(cmd)
  finally:
    if not setup.repo_url and not run.dry_run and os.path.exists(setup.tarball(s.name)):
      os.remove(setup.tarball(s.name))


def start(s: Slice, argv: Sequence[str], run: Runner) -> None:
  logging.info("starting `jaxlm %s` on %d worker%s", shlex.join(argv), s.hosts,
               "s" * (s.hosts > 1))
  run(start_command(s, argv))


def watch(s: Slice, argv: Sequence[str], setup: Setup, run: Runner, *, poll: float,
          max_retries: int, down_when_done: bool,
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
    run(probe_command(s))
    return

  workdir = workdir_of(argv) or ""
  if not workdir.startswith("gs://"):
    logging.warning("--workdir %s lives on the VM: if the slice is lost, the relaunch starts "
                    "from scratch (use a gs:// workdir to resume)", workdir)
  logging.info("watching %s in %s: a check every %gs, at most %d relaunch%s", s.name, s.zone,
               poll, max_retries, "es" * (max_retries != 1))

  state = vm_state(s, run)
  if state not in ("READY", *LOST):
    raise JaxlmError(f"{s.name} is {state}: run watch again once it is READY (or delete it "
                     "with jaxlm tpu down)")
  status = "none"
  if state == "READY":
    status = job_status(run(probe_command(s), capture=True, check=False, quiet=True).stdout)
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
    if state in LOST:
      problem, recreate = f"{s.name} is {state}", True
    elif state == "READY":
      seen = last_status
      last_status = job_status(run(probe_command(s), capture=True, check=False,
                                   quiet=True).stdout)
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
        run(stop_command(s, "KILL"))  # Peers of a dead process may hang on; clear them.
        if not ready:
          set_up(s, setup, run)
      ready = True
      start(s, argv, run)
    except JaxlmError as e:
      logging.warning("relaunch %d failed: %s", relaunches, e)  # The next poll tries again.


def _finish(s: Slice, run: Runner, down_when_done: bool) -> None:
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
  """The checkout this jaxlm was imported from."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  s = make_slice(name, zone, accelerator if needs_shape else None, version=version, spot=spot,
                 preemptible=preemptible, queued=queued, check_zone=check_zone)
  if verb in ("run", "watch"):
    check_command(s, argv)
    if verb == "watch" and argv[0] != "train":
      raise JaxlmError("tpu watch relaunches `train` runs (it knows when they are done); "
                       f"got {argv[0]!r}")
  elif argv:
    raise JaxlmError(f"tpu {verb} takes no command after --, got {shlex.join(argv)!r}")
  if max_retries < 0:
    raise JaxlmError(f"--tpu_max_retries must be >= 0, got {max_retries}")
  setup = Setup(repo_root(), repo_url, jax)
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
    run(stop_command(s))
  elif verb == "down":
    run(s.delete())
  else:
    watch(s, argv, setup, run, poll=poll, max_retries=max_retries,
          down_when_done=down_when_done)


def _follow(s: Slice, run: Runner) -> None:
  if not run.dry_run:
    logging.info("following worker 0's log; Ctrl-C stops following, not the run (jaxlm tpu "
                 "stop ends it with a checkpoint)")
    sys.stderr.flush()
  run(follow_command(s))
