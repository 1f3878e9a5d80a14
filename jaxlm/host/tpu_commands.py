"""Cloud TPU VMs: the slice and the gcloud commands that manage it; this only builds argv lists."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import tempfile
from collections.abc import Sequence

from jaxlm.errors import JaxlmError
from jaxlm.host import tpu_types

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
  accelerator: tpu_types.Accelerator | None  # Needed to create the slice, not to reach it.
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
  acc = tpu_types.find_accelerator(accelerator) if accelerator else None
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
  # Quoted as one shell word: inside double quotes `$(...)` and backticks would still run on
  # every worker. Single quotes (shlex) keep brackets and everything else literal.
  jax = shlex.quote(setup.jax)
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
  """Signals the run on every worker; TERM makes it checkpoint and exit (see preemption.py)."""
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
