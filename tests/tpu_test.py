"""The Cloud TPU launcher: exact gcloud commands, watch against a fake gcloud, bad input."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error, run_jaxlm

from jaxlm.host import tpu_commands, tpu_types

V4_8 = ["--tpu_name=lm1", "--tpu_zone=us-central2-b", "--tpu_accelerator=v4-8"]
V4_32 = ["--tpu_name=lm32", "--tpu_zone=us-central2-b", "--tpu_accelerator=v4-32"]
TRAIN = ["train", "--config", "configs/shakespeare_char.py", "--workdir", "gs://bucket/sc"]

# The remote scripts, spelled out once; each pinned command below uses them verbatim.
INSTALL = ("'python3 -m pip install --user --quiet uv && rm -rf ~/jaxlm-venv && "
           "~/.local/bin/uv venv --quiet --python 3.12 ~/jaxlm-venv && "
           "~/.local/bin/uv pip install --quiet --python ~/jaxlm-venv/bin/python "
           "\"$HOME/jaxlm[gcs]\" '\"'\"'jax[tpu]'\"'\"''")
UNPACK = ("'rm -rf ~/jaxlm && mkdir -p ~/jaxlm && tar -xzf ~/jaxlm.tar.gz -C ~/jaxlm "
          "&& rm ~/jaxlm.tar.gz'")


def start_script(env: str) -> str:
  return ("'cd ~/jaxlm || exit 1; if kill -0 \"$(cat ~/jaxlm-run.pid 2>/dev/null)\" "
          "2>/dev/null; then echo \"jaxlm: a run is still going on $(hostname)\" >&2; exit 1; "
          f"fi; {env}nohup ~/jaxlm-venv/bin/python -m jaxlm.cli train --config "
          "configs/shakespeare_char.py --workdir gs://bucket/sc > ~/jaxlm-run.log 2>&1 "
          "< /dev/null & echo $! > ~/jaxlm-run.pid'")


FOLLOW = ("'test -f ~/jaxlm-run.log || { echo \"jaxlm: no run was started on $(hostname)\" >&2; "
          "exit 1; }; tail --pid=\"$(cat ~/jaxlm-run.pid)\" -n +1 -F ~/jaxlm-run.log'")
PROBE = ("'if kill -0 \"$(cat ~/jaxlm-run.pid 2>/dev/null)\" 2>/dev/null; then echo running; "
         "else echo exited; grep -E \"stopped at step|done: \" ~/jaxlm-run.log 2>/dev/null "
         "| tail -n 2; fi'")


@pytest.fixture(autouse=True)
def _no_real_gcloud(tmp_path_factory, monkeypatch):
  """Puts a gcloud that refuses to work first on PATH: no test may reach the real one."""
  bin_dir = tmp_path_factory.mktemp("guard")
  guard = bin_dir / "gcloud"
  guard.write_text("#!/bin/sh\necho 'tests must not run the real gcloud' >&2\nexit 99\n")
  guard.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def dry_run(*args: str) -> subprocess.CompletedProcess:
  proc = run_jaxlm("tpu", "--dry_run", *args, timeout=60)  # Before any `--`.
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


# ---------------------------------------------------------------------------------------------
# The accelerator table.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, chips, hosts, chips_per_host, generation", [
    ("v2-8", 4, 1, 4, "v2"),
    ("v3-32", 16, 4, 4, "v3"),
    ("v4-8", 4, 1, 4, "v4"),
    ("v4-16", 8, 2, 4, "v4"),
    ("v4-32", 16, 4, 4, "v4"),
    ("v5litepod-1", 1, 1, 1, "v5e"),
    ("v5litepod-8", 8, 1, 8, "v5e"),
    ("v5litepod-16", 16, 4, 4, "v5e"),
    ("v5p-8", 4, 1, 4, "v5p"),
    ("v5p-128", 64, 16, 4, "v5p"),
    ("v6e-8", 8, 1, 8, "v6e"),
    ("v6e-256", 256, 64, 4, "v6e"),
])
def test_accelerator_table(name, chips, hosts, chips_per_host, generation):
  acc = tpu_types.find_accelerator(name)
  assert (acc.chips, acc.hosts, acc.chips_per_host, acc.generation) == (
      chips, hosts, chips_per_host, generation)


def test_runtime_versions_and_zones_follow_the_generation():
  assert tpu_types.find_accelerator("v4-8").runtime_version == "tpu-ubuntu2204-base"
  assert tpu_types.find_accelerator("v5litepod-16").runtime_version == "v2-alpha-tpuv5-lite"
  assert tpu_types.find_accelerator("v5p-8").runtime_version == "v2-alpha-tpuv5"
  assert tpu_types.find_accelerator("v6e-4").runtime_version == "v2-alpha-tpuv6e"
  assert tpu_types.find_accelerator("v4-32").zones == ("us-central2-b",)
  # v2-8 is offered in more zones than the v2 pods.
  assert "us-central1-b" in tpu_types.find_accelerator("v2-8").zones
  assert "us-central1-b" not in tpu_types.find_accelerator("v2-32").zones


@pytest.mark.parametrize("output, status", [
    ("running\n", "running"),
    ("exited\nI0101 train.py:454] done: 100 steps in 1m (60.0s wall)\n", "finished"),
    ("exited\n", "died"),  # No done: line: it crashed.
    ("exited\nI0101] stopped at step 50/100 (SIGTERM) with a checkpoint; run the same command "
     "to resume\nI0101] done: 50 steps in 30s\n", "stopped"),  # Interrupted: resume it.
    ("exited\nI0101] stopped at step 50/100 (train.stop_at=50) with a checkpoint; ...\n"
     "I0101] done: 50 steps in 30s\n", "finished"),  # Stopped where it was asked to.
    ("", "unknown"),  # The ssh failed: ask again later.
])
def test_job_status(output, status):
  assert tpu_commands.job_status(output) == status


# ---------------------------------------------------------------------------------------------
# --dry_run prints the exact commands.
# ---------------------------------------------------------------------------------------------

def test_dry_run_single_host_up_and_run(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # Where the tarball of HEAD would go.
  tarball = tmp_path / "jaxlm-lm1.tar.gz"
  up = dry_run("up", *V4_8, "--tpu_spot")
  assert up.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm create lm1 --zone=us-central2-b --accelerator-type=v4-8 "
      "--version=tpu-ubuntu2204-base --spot",
      f"git -C {REPO} archive --format=tar.gz --output={tarball} HEAD",
      f"gcloud compute tpus tpu-vm scp {tarball} lm1:jaxlm.tar.gz --zone=us-central2-b "
      "--worker=all",
      f"gcloud compute tpus tpu-vm ssh lm1 --zone=us-central2-b --worker=all --command {UNPACK}",
      f"gcloud compute tpus tpu-vm ssh lm1 --zone=us-central2-b --worker=all --command {INSTALL}",
  ]
  run = dry_run("run", *V4_8, "--", *TRAIN)
  assert run.stdout.splitlines() == [
      # One host: no JAXLM_DISTRIBUTED.
      "gcloud compute tpus tpu-vm ssh lm1 --zone=us-central2-b --worker=all --command "
      + start_script(""),
      f"gcloud compute tpus tpu-vm ssh lm1 --zone=us-central2-b --worker=0 --command {FOLLOW}",
  ]


def test_dry_run_multi_host_queued_spot_up_and_run(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  tarball = tmp_path / "jaxlm-lm32.tar.gz"
  up = dry_run("up", *V4_32, "--tpu_spot", "--tpu_queued")
  assert up.stdout.splitlines() == [
      "gcloud compute tpus queued-resources create lm32 --node-id=lm32 --zone=us-central2-b "
      "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot",
      "gcloud compute tpus queued-resources describe lm32 --zone=us-central2-b "
      "'--format=value(state.state)'",
      f"git -C {REPO} archive --format=tar.gz --output={tarball} HEAD",
      f"gcloud compute tpus tpu-vm scp {tarball} lm32:jaxlm.tar.gz --zone=us-central2-b "
      "--worker=all",
      f"gcloud compute tpus tpu-vm ssh lm32 --zone=us-central2-b --worker=all --command {UNPACK}",
      f"gcloud compute tpus tpu-vm ssh lm32 --zone=us-central2-b --worker=all --command "
      f"{INSTALL}",
  ]
  run = dry_run("run", *V4_32, "--", *TRAIN)
  assert run.stdout.splitlines() == [
      # Four hosts: every worker joins one JAX cluster.
      "gcloud compute tpus tpu-vm ssh lm32 --zone=us-central2-b --worker=all --command "
      + start_script("JAXLM_DISTRIBUTED=1 "),
      f"gcloud compute tpus tpu-vm ssh lm32 --zone=us-central2-b --worker=0 --command {FOLLOW}",
  ]
  down = dry_run("down", "--tpu_name=lm32", "--tpu_zone=us-central2-b", "--tpu_queued")
  assert down.stdout.splitlines() == [
      "gcloud compute tpus queued-resources delete lm32 --zone=us-central2-b --force --quiet"]


def test_dry_run_watch_v5e_from_a_git_url():
  watch = dry_run("watch", "--tpu_name=e16", "--tpu_zone=us-west4-a",
                  "--tpu_accelerator=v5litepod-16", "--tpu_spot",
                  "--tpu_repo=https://example.com/jaxlm.git", "--tpu_jax=jax[tpu]==0.6.2",
                  "--", *TRAIN)
  ssh = "gcloud compute tpus tpu-vm ssh e16 --zone=us-west4-a"
  assert watch.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm describe e16 --zone=us-west4-a '--format=value(state)'",
      "gcloud compute tpus tpu-vm create e16 --zone=us-west4-a --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --spot",
      f"{ssh} --worker=all --command 'rm -rf ~/jaxlm && git clone --depth=1 "
      "https://example.com/jaxlm.git ~/jaxlm'",
      f"{ssh} --worker=all --command " + INSTALL.replace("jax[tpu]'", "jax[tpu]==0.6.2'"),
      f"{ssh} --worker=all --command " + start_script("JAXLM_DISTRIBUTED=1 "),
      "gcloud compute tpus tpu-vm describe e16 --zone=us-west4-a '--format=value(state)'",
      f"{ssh} --worker=0 --command {PROBE}",
  ]


def test_other_verbs_dry_run():
  where = ["--tpu_name=lm1", "--tpu_zone=us-central2-b"]
  assert dry_run("logs", *where).stdout.splitlines() == [
      f"gcloud compute tpus tpu-vm ssh lm1 --zone=us-central2-b --worker=0 --command {FOLLOW}"]
  assert dry_run("down", *where).stdout.splitlines() == [
      "gcloud compute tpus tpu-vm delete lm1 --zone=us-central2-b --quiet"]
  stop = dry_run("stop", *where).stdout.splitlines()
  assert len(stop) == 1 and "--worker=all" in stop[0] and "kill -TERM" in stop[0]


def test_notpu_check_zone_trusts_the_user():
  proc = dry_run("up", "--tpu_name=lm1", "--tpu_zone=us-east5-a", "--tpu_accelerator=v4-8",
                 "--notpu_check_zone", "--tpu_repo=https://example.com/jaxlm.git")
  assert proc.stdout.splitlines()[0].startswith(
      "gcloud compute tpus tpu-vm create lm1 --zone=us-east5-a --accelerator-type=v4-8")


def test_readme_shows_the_commands_jaxlm_prints(tmp_path, monkeypatch):
  """experiments/tpu/README.md quotes the dry run of example 1; keep the two in sync."""
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  with open(os.path.join(REPO, "experiments", "tpu", "README.md"), encoding="utf-8") as f:
    readme = f.read().splitlines()
  where = ["--tpu_name=sc-v4", "--tpu_zone=us-central2-b", "--tpu_accelerator=v4-8"]
  printed = (dry_run("up", *where, "--tpu_spot").stdout + dry_run(
      "run", *where, "--", "train", "--config", "configs/shakespeare_char_large.py",
      "--workdir", "gs://my-bucket/sc-large", "--config.model.dtype=bfloat16").stdout)
  for line in printed.splitlines():
    line = line.replace(REPO, "/home/you/jaxlm").replace(str(tmp_path), "/tmp")
    assert line in readme, line


def test_worker_scripts_in_a_local_shell(tmp_path):
  """The start, probe, follow and stop scripts, run by bash in a fake home with a fake python."""
  venv_bin = tmp_path / "jaxlm-venv" / "bin"
  venv_bin.mkdir(parents=True)
  (tmp_path / "jaxlm").mkdir()
  python = venv_bin / "python"
  python.write_text("#!/bin/sh\necho \"I0101 train.py:285] args: $*\"\nsleep 0.5\n"
                    "echo \"I0101 train.py:454] done: 3 steps in 0s\"\n")
  python.chmod(0o755)
  s = tpu_commands.make_slice("lm32", "us-central2-b", "v4-32")
  env = dict(os.environ, HOME=str(tmp_path))

  def remote(cmd: list[str]) -> subprocess.CompletedProcess:
    script = cmd[cmd.index("--command") + 1]
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)

  # Nothing ran yet.
  assert tpu_commands.job_status(remote(tpu_commands.probe_command(s)).stdout) == "died"
  assert remote(tpu_commands.start_command(s, TRAIN)).returncode == 0
  assert tpu_commands.job_status(remote(tpu_commands.probe_command(s)).stdout) == "running"
  again = remote(tpu_commands.start_command(s, TRAIN))  # Refused: one run per slice at a time.
  assert again.returncode == 1 and "still going" in again.stderr
  log = remote(tpu_commands.follow_command(s)).stdout  # Returns once the run exits.
  assert "args: -m jaxlm.cli train --config configs/shakespeare_char.py" in log
  assert tpu_commands.job_status(remote(tpu_commands.probe_command(s)).stdout) == "finished"
  assert remote(tpu_commands.start_command(s, TRAIN)).returncode == 0
  # Waits for the exit.
  assert "sent SIGKILL" in remote(tpu_commands.stop_command(s, "KILL")).stdout
  assert tpu_commands.job_status(remote(tpu_commands.probe_command(s)).stdout) == "died"


# ---------------------------------------------------------------------------------------------
# watch, against a fake gcloud first on PATH.
# ---------------------------------------------------------------------------------------------

FAKE_GCLOUD = '''#!{python}
"""Stands in for gcloud: logs its argv; answers describe and the run probe from script.json."""
import json, os, shlex, sys
here = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(here, "calls.log"), "a") as f:
  f.write(shlex.join(args) + "\\n")


def next_answer(key):
  # Answers are used in order; the last one repeats.
  path = os.path.join(here, "script.json")
  with open(path) as f:
    script = json.load(f)
  answer = script[key].pop(0) if len(script[key]) > 1 else script[key][0]
  with open(path, "w") as f:
    json.dump(script, f)
  return answer


if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
  state = next_answer("describe")
  if state == "NOT_FOUND":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Requested entity was "
             "not found.")
  print(state)
elif "ssh" in args and "echo running" in args[-1]:
  print(next_answer("probe"))
'''

DONE = "exited\nI0101 12:00:00.0 1 train.py:454] done: 5000 steps in 2h (7200.0s wall)"
WATCH = ["--tpu_name=lm1", "--tpu_zone=us-central2-b", "--tpu_accelerator=v4-8", "--tpu_spot",
         "--tpu_repo=https://example.com/jaxlm.git", "--tpu_poll=0"]


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """Installs the fake; call it with the describe and probe answers; it returns the call log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
  gcloud.chmod(0o755)
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

  def script(describe: list[str], probe: list[str]):
    (tmp_path / "script.json").write_text(json.dumps({"describe": describe, "probe": probe}))
    return lambda: (tmp_path / "calls.log").read_text().splitlines()
  return script


def count(calls: list[str], fragment: str) -> int:
  return sum(fragment in call for call in calls)


def test_watch_recreates_a_preempted_slice_and_reruns_once(fake_gcloud):
  calls = fake_gcloud(describe=["READY", "PREEMPTED", "READY"], probe=["running", DONE])
  proc = run_jaxlm("tpu", "watch", *WATCH, "--tpu_max_retries=3", "--", *TRAIN, timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  calls = calls()
  assert count(calls, "tpu-vm delete lm1") == 1
  assert count(calls, "tpu-vm create lm1") == 1
  assert count(calls, "git clone") == 1 and count(calls, "uv pip install") == 1
  starts = [c for c in calls if "nohup" in c]
  # Exactly one rerun, of exactly the command `jaxlm tpu run` starts.
  run = dry_run("run", "--tpu_name=lm1", "--tpu_zone=us-central2-b", "--tpu_accelerator=v4-8",
                "--", *TRAIN).stdout.splitlines()[0]
  assert starts == [run.removeprefix("gcloud ")]
  # Delete, create, set up, start: in that order.
  order = [i for i, c in enumerate(calls)
           if any(k in c for k in ("tpu-vm delete", "tpu-vm create", "git clone", "nohup"))]
  assert [calls[i].split()[3] for i in order[:2]] == ["delete", "create"]
  assert "lm1 is PREEMPTED: relaunch 1 of 3" in proc.stderr
  assert "the run finished after 1 relaunch" in proc.stderr


def test_watch_gives_up_after_max_retries(fake_gcloud):
  calls = fake_gcloud(describe=["READY", "PREEMPTED"], probe=["running"])
  proc = run_jaxlm("tpu", "watch", *WATCH, "--tpu_max_retries=2", "--", *TRAIN, timeout=60)
  assert_one_line_error(proc, "gave up after 2 relaunches: lm1 is PREEMPTED")
  calls = calls()
  assert count(calls, "tpu-vm delete lm1") == 2
  assert count(calls, "tpu-vm create lm1") == 2
  assert count(calls, "nohup") == 2
  assert "relaunch 1 of 2" in proc.stderr and "relaunch 2 of 2" in proc.stderr


def test_watch_restarts_a_dead_run_in_place(fake_gcloud):
  calls = fake_gcloud(describe=["READY"], probe=["running", "exited", DONE])
  proc = run_jaxlm("tpu", "watch", *WATCH, "--", *TRAIN, timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  calls = calls()
  # The slice is healthy: no delete or create, just clear the leftovers and start again.
  assert count(calls, "tpu-vm delete") == 0 and count(calls, "tpu-vm create") == 0
  assert count(calls, "kill -KILL") == 1 and count(calls, "nohup") == 1
  assert "died before its final done: line: relaunch 1 of 5" in proc.stderr


def test_watch_waits_one_check_when_a_signal_stopped_the_run(fake_gcloud):
  # A preemption notice stops the run (with a checkpoint) before the slice reports PREEMPTED:
  # watch does not restart it in place, it looks once more and then recreates the slice.
  stopped = ("exited\nI0101] stopped at step 800/5000 (SIGTERM) with a checkpoint; run the same "
             "command to resume\nI0101] done: 800 steps in 20m")
  calls = fake_gcloud(describe=["READY", "READY", "PREEMPTED", "READY"],
                      probe=["running", stopped, DONE])
  proc = run_jaxlm("tpu", "watch", *WATCH, "--", *TRAIN, timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  calls = calls()
  assert count(calls, "kill -KILL") == 0
  assert count(calls, "tpu-vm delete lm1") == 1 and count(calls, "tpu-vm create lm1") == 1
  assert count(calls, "nohup") == 1
  assert "stopped by a signal; checking the slice once more" in proc.stderr


def test_watch_launches_a_missing_slice(fake_gcloud):
  calls = fake_gcloud(describe=["NOT_FOUND", "READY"], probe=[DONE])
  proc = run_jaxlm("tpu", "watch", *WATCH, "--tpu_down_when_done", "--", *TRAIN, timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  calls = calls()
  assert count(calls, "tpu-vm create lm1") == 1 and count(calls, "nohup") == 1
  assert calls[-1] == "compute tpus tpu-vm delete lm1 --zone=us-central2-b --quiet"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback.
# ---------------------------------------------------------------------------------------------

def test_unknown_accelerator_type():
  proc = run_jaxlm("tpu", "up", "--tpu_name=lm1", "--tpu_zone=us-central2-b",
                   "--tpu_accelerator=v4-9", "--dry_run")
  assert_one_line_error(proc, "unknown TPU accelerator type 'v4-9'", "v4-8, v4-16")


def test_zone_does_not_offer_the_accelerator():
  proc = run_jaxlm("tpu", "up", "--tpu_name=lm1", "--tpu_zone=europe-west4-a",
                   "--tpu_accelerator=v4-8", "--dry_run")
  assert_one_line_error(proc, "v4-8 is not offered in europe-west4-a", "us-central2-b")


def test_multi_host_slice_with_a_local_workdir():
  proc = run_jaxlm("tpu", "run", *V4_32, "--dry_run", "--", "train", "--config",
                   "configs/shakespeare_char.py", "--workdir", "runs/sc")
  assert_one_line_error(proc, "--workdir runs/sc", "4 workers", "cannot share it", "gs://")


def test_gcloud_missing(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # An empty directory: no gcloud anywhere.
  proc = run_jaxlm("tpu", "up", *V4_8)
  assert_one_line_error(proc, "gcloud is not on PATH")


@pytest.mark.parametrize("args, fragment", [
    (["up", *V4_8, "--tpu_spot", "--tpu_preemptible"], "choose one of --tpu_spot"),
    (["up", "--tpu_name=LM_1", "--tpu_zone=us-central2-b", "--tpu_accelerator=v4-8"],
     "not a valid TPU name"),
    (["run", *V4_8], "give the jaxlm command to run after --"),
    (["run", *V4_8, "--", "train", "--config", "c.py"], "needs --workdir"),
    (["watch", *V4_8, "--", "bench", "--config", "c.py"], "relaunches `train` runs"),
    (["up", *V4_8, "--", *TRAIN], "tpu up takes no command after --"),
    (["launch", *V4_8], "unknown tpu verb 'launch'"),
    (["up", "--tpu_name=lm1", "--tpu_zone=us-central2-b"], "needs --tpu_accelerator"),
])
def test_other_bad_input(args, fragment):
  assert_one_line_error(run_jaxlm("tpu", "--dry_run", *args), fragment)
