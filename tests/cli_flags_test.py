"""Flag ownership in the `jaxlm` console script: each command's --help, a flag of another
command as a one-line error, and what every command shares (absl's logging flags).

Every case here fails or exits before jax is imported, so each subprocess takes a fraction of a
second; none of them trains.
"""

import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO, assert_one_line_error, run_jaxlm

SMOKE = os.path.join(CONFIGS, "smoke.py")

# Each command's flags, spelled out (the same names, defaults and help texts as before the CLI
# was split into one module per command).
OWN = {
    "train": ["config", "workdir"],
    "prepare": ["config", "rebuild"],
    "eval": ["workdir", "step", "eval_steps", "tasks", "val", "truncation"],
    "sample": ["workdir", "step", "prompt", "prompt_file", "max_new_tokens", "temperature",
               "top_k", "top_p", "num_samples", "seed"],
    "sweep": ["config", "workdir", "parallel", "summarize", "worker", "storage", "n_trials"],
    "bench": ["config", "steps", "json_out", "profile", "sampling"],
    "params": ["config", "workdir", "step", "format", "device", "peak_tflops",
               "device_memory_gb", "mfu", "num_devices", "plot", "plot_lr"],
    "convert": ["workdir", "from_hf", "to_hf", "out"],
    "launch": ["num_processes", "devices_per_process", "timeout", "init_timeout",
               "heartbeat_timeout", "coordinator", "process_ids"],
    "tpu": ["tpu_name", "tpu_zone", "tpu_accelerator", "tpu_version", "tpu_spot",
            "tpu_preemptible", "tpu_queued", "tpu_repo", "tpu_jax", "tpu_check_zone", "tpu_poll",
            "tpu_max_retries", "tpu_down_when_done", "dry_run"],
}

# Runs the CLI like the console script, then says on stderr whether jax was ever imported.
_JAX_PROBE = ("import atexit, sys\n"
              "atexit.register(lambda: sys.stderr.write("
              "'\\njax imported: %s\\n' % ('jax' in sys.modules)))\n"
              "sys.argv[0] = 'jaxlm'\n"
              "from jaxlm.cli import run\n"
              "run()\n")


def probe(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", _JAX_PROBE, *args], capture_output=True,
                        text=True, timeout=60, cwd=REPO)


def spelling(name: str) -> str:
  """How --help spells a flag: `--[no]name` for a boolean, `--name=` for the others."""
  from jaxlm.cli import command_module
  for command in OWN:
    fv = command_module(command).FLAGS
    if name in fv:
      return f"--[no]{name} " if fv[name].boolean else f"--{name}="
  raise KeyError(name)


def test_the_flag_table_is_what_the_modules_define():
  from jaxlm.cli import COMMANDS, command_module, common
  assert list(COMMANDS) == list(OWN)
  for command in COMMANDS:
    assert [f.name for f in common.own_flags(command_module(command).FLAGS)] == OWN[command]


@pytest.mark.parametrize("command", list(OWN))
def test_help_lists_the_commands_own_flags_only(command):
  proc = probe(command, "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(f"usage: jaxlm {command} ")
  assert "jax imported: False" in proc.stderr
  text = " ".join(proc.stdout.split())  # Help texts wrap; compare them with spaces collapsed.
  from jaxlm.cli import command_module
  fv = command_module(command).FLAGS
  for name in OWN[command]:
    assert spelling(name) in proc.stdout, name
    assert " ".join(fv[name].help.split()) in text, name
  others = {name for flags in OWN.values() for name in flags} - set(OWN[command])
  for name in others:
    assert spelling(name) not in proc.stdout, name


@pytest.mark.parametrize("command", ["train", "convert", "tpu"])
def test_dash_h_and_helpfull(command):
  short = run_jaxlm(command, "-h", timeout=60)
  assert short.returncode == 0 and short.stdout.startswith(f"usage: jaxlm {command} ")
  full = run_jaxlm(command, "--helpfull", timeout=60)
  assert full.returncode == 0 and full.stdout.startswith(short.stdout.split("\nabsl")[0])
  assert "--verbosity=N, -v" in full.stdout and "--[no]logtostderr" in full.stdout
  assert "--verbosity" not in short.stdout.split("absl's logging flags")[0]


def test_help_wins_over_bad_flags_after_it():
  proc = run_jaxlm("train", "--help", "--top_k", "3", timeout=60)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: jaxlm train ")


def test_top_level_help_and_python_dash_m():
  for args in (["--help"], ["-h"], ["help"]):
    proc = run_jaxlm(*args, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: jaxlm <command>")
    assert all(f"\n  {command} " in proc.stdout for command in OWN)
  proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "sample", "--help"],
                        capture_output=True, text=True, timeout=60, cwd=REPO)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: jaxlm sample ")
  assert "--top_k=" in proc.stdout


def test_no_command_and_unknown_command_print_usage():
  proc = run_jaxlm(timeout=60)
  assert proc.returncode == 2 and proc.stderr.startswith("usage: jaxlm <command>")
  proc = run_jaxlm("trian", "--config", SMOKE, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.startswith("unknown command 'trian' (did you mean train?)\nusage: jaxlm")
  proc = run_jaxlm("--workdir", "w", "eval", timeout=60)
  assert_one_line_error(proc, "the command comes first", "'--workdir'")
  assert "usage: jaxlm <command>" in proc.stderr


@pytest.mark.parametrize("args", [
    ["--top_k", "3"], ["--top_k=3"], ["-top_k=3"],
])
def test_a_flag_of_another_command(args):
  proc = probe("train", *args, "--config", SMOKE, "--workdir", "/nonexistent/w")
  line = assert_one_line_error(proc)
  assert line == "jaxlm: error: --top_k is a flag of 'jaxlm sample', not of 'jaxlm train'"
  assert "jax imported: False" in proc.stderr


def test_a_negated_boolean_of_another_command():
  line = assert_one_line_error(run_jaxlm("train", "--notpu_spot", timeout=60))
  assert line == "jaxlm: error: --notpu_spot is a flag of 'jaxlm tpu', not of 'jaxlm train'"
  line = assert_one_line_error(run_jaxlm("bench", "--tpu_spot", "--config", SMOKE, timeout=60))
  assert line == "jaxlm: error: --tpu_spot is a flag of 'jaxlm tpu', not of 'jaxlm bench'"


def test_a_flag_of_several_other_commands():
  line = assert_one_line_error(run_jaxlm("bench", "--workdir", "w", timeout=60))
  assert line == ("jaxlm: error: --workdir is a flag of 'jaxlm train', 'jaxlm eval', "
                  "'jaxlm sample', 'jaxlm sweep', 'jaxlm params' and 'jaxlm convert', "
                  "not of 'jaxlm bench'")
  # eval has no --config, so no --config.KEY overrides either.
  assert_one_line_error(run_jaxlm("eval", "--workdir", "w", "--config.train.steps=3",
                                  timeout=60),
                        "--config.train.steps is a flag of 'jaxlm train'", "not of 'jaxlm eval'")


def test_launch_and_tpu_say_where_the_childs_flags_go():
  proc = run_jaxlm("launch", "--num_processes=2", "train", "--config", SMOKE, timeout=60)
  assert_one_line_error(proc, "--config is a flag of 'jaxlm train'", "not of 'jaxlm launch'",
                        "go after --")
  proc = run_jaxlm("tpu", "run", "--tpu_name=lm1", "--tpu_zone=us-central2-b",
                   "--tpu_accelerator=v4-8", "--dry_run", "train", "--workdir", "gs://b/w",
                   timeout=60)
  assert_one_line_error(proc, "--workdir is a flag of", "not of 'jaxlm tpu'", "go after --")


def test_flags_after_double_dash_are_the_childs():
  # --top_k after `--` is not launch's to parse: launch_local sees it (and rejects N=0 first).
  proc = run_jaxlm("launch", "--num_processes=0", "--", "train", "--top_k", "3", timeout=60)
  assert_one_line_error(proc, "--num_processes must be >= 1, got 0")


def test_a_flag_of_no_command():
  line = assert_one_line_error(run_jaxlm("train", "--foo", "1", timeout=60))
  assert line.startswith("jaxlm: error: unknown flag --foo")
  assert "jaxlm train --help lists its flags" in line
  line = assert_one_line_error(run_jaxlm("eval", "--workdirr=w", timeout=60))
  assert line.startswith("jaxlm: error: unknown flag --workdirr (did you mean --workdir?)")


def test_config_overrides_need_a_config():
  proc = run_jaxlm("train", "--workdir", "w", "--config.train.steps=3", timeout=60)
  assert_one_line_error(proc, "--config.train.steps overrides a config key",
                        "give --config FILE before it")


# A cheap call per command that parses its flags and fails in its main, before any jax.
REACHES_MAIN = {
    "train": ([], "--config is required"),
    "prepare": ([], "--config is required"),
    "eval": ([], "--workdir is required"),
    "sample": (["--num_samples=0", "--workdir=w"], "--num_samples must be >= 1"),
    "sweep": (["--summarize"], "--workdir is required"),
    "bench": (["--steps=3"], "--config is required"),
    "params": ([], "give --config"),
    "convert": (["--workdir=w"], "exactly one of --from_hf DIR and --to_hf"),
    "launch": (["--num_processes=1"], "nothing to launch"),
    "tpu": (["--dry_run"], "unknown tpu verb ''"),
}


@pytest.mark.parametrize("command", list(OWN))
@pytest.mark.parametrize("verbosity", [["--verbosity=1"], ["-v", "1"]])
def test_every_command_takes_absl_verbosity(command, verbosity):
  args, fragment = REACHES_MAIN[command]
  proc = probe(command, *verbosity, *args)
  assert_one_line_error(proc, fragment)
  assert "jax imported: False" in proc.stderr


@pytest.mark.parametrize("command", ["train", "eval", "sample", "params"])
def test_a_stray_argument_is_a_one_line_error(command):
  proc = run_jaxlm(command, "--workdir", "/nonexistent", "runs/typo")
  assert_one_line_error(proc, "unexpected argument 'runs/typo'", f"jaxlm {command} takes flags")
