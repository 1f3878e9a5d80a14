"""Checkpoints: exact resume, atomic async saves under kill -9, SIGTERM, resharding, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, assert_one_line_error, load_config, run_jaxlm, start_jaxlm

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import runs, sharding, train
from jaxlm.errors import JaxlmError

SMOKE = os.path.join(CONFIGS, "smoke.py")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses_after(records, step):
  return [(r["step"], r[k]) for r in records for k in ("train/loss", "val/loss")
          if k in r and r["step"] > step]


def final_params(workdir):
  return runs.load_run(workdir).params


def smoke(**overrides):
  cfg = load_config("smoke")
  cfg.train.steps = 20
  cfg.checkpoint.every = 5
  cfg.train.eval_every = 10
  cfg.model.dropout = 0.1  # Dropout makes the test see whether the rng is derived from the step.
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


@pytest.mark.slow
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  train.train_and_evaluate(smoke(), whole)
  first = train.train_and_evaluate(smoke(**{"train.stop_at": 10}), parts)
  assert first["stopped_early"] and first["step"] == 10
  assert checkpoint_lib.Checkpointer(os.path.join(parts, "checkpoints")).latest_step() == 10
  second = train.train_and_evaluate(smoke(), parts)
  assert second["step"] == 20 and not second["stopped_early"]

  a, b = losses_after(read_metrics(whole), 10), losses_after(read_metrics(parts), 10)
  assert a and a == b  # Same steps, same losses, to the last bit.
  jax.tree.map(np.testing.assert_array_equal, final_params(whole), final_params(parts))


def test_checkpoints_keep_latest_k_plus_best(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=2)
  params = {"w": jnp.ones((2, 3))}
  for step, val_loss in [(1, 3.0), (2, 1.0), (3, 2.5), (4, None), (5, 2.0)]:
    ckpt.save(step, {"params": params}, {}, val_loss=val_loss)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4, 5]  # 4 and 5 are the latest two; 2 has the best val loss.
  assert ckpt.best_step() == 2 and ckpt.resolve_step("best") == 2
  with pytest.raises(JaxlmError, match="no checkpoint at step 3.*available steps: 2, 4, 5"):
    ckpt.resolve_step(3)
  ckpt.close()


@pytest.mark.parametrize("save_devices, restore_devices", [(8, 1), (1, 8)])
def test_restore_onto_a_different_device_count(tmp_path, save_devices, restore_devices):
  cfg = load_config("smoke")
  model = model_lib.make_model(config_lib.model_config(cfg, 65))
  rules = sharding.get_rules("fsdp")

  def mesh_of(n):
    return sharding.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, jax.devices()[:n])

  target_save = runs.abstract_params(model, mesh_of(save_devices), rules)
  params = jax.jit(lambda r: nn.unbox(model_lib.init_params(model, r)),
                   out_shardings=jax.tree.map(lambda a: a.sharding, target_save))(
                       jax.random.key(0))
  kernel = params["h_0"]["mlp"]["fc"]["kernel"]
  assert len(kernel.sharding.device_set) == save_devices
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"))
  ckpt.save(0, {"params": params}, {})
  ckpt.wait()
  target = runs.abstract_params(model, mesh_of(restore_devices), rules)
  restored = ckpt.restore(0, {"params": target})["params"]
  ckpt.close()
  restored_kernel = restored["h_0"]["mlp"]["fc"]["kernel"]
  assert len(restored_kernel.sharding.device_set) == restore_devices
  if restore_devices > 1:  # Really sharded along embed (fsdp), as the rules say.
    assert restored_kernel.sharding.spec[0] == "fsdp"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(restored))


def wait_for_line(proc, pattern, timeout=240):
  """Reads the process' log until a line contains `pattern`; returns the log so far."""
  seen = []
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line:
      break
    seen.append(line)
    if pattern in line:
      return "".join(seen)
  proc.kill()
  raise AssertionError(f"never saw {pattern!r}; log:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=400",
          "--config.train.log_every=1", "--config.checkpoint.every=1000",
          "--config.train.eval_every=0"]
  proc = start_jaxlm(*args)
  try:
    wait_for_line(proc, "step 20/400")
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, rest[-2000:]
  assert "SIGTERM received" in rest and "stopped at step" in rest
  steps = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert len(steps) == 1 and 20 <= steps[0] < 400
  resumed = run_jaxlm(*args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from checkpoint at step {steps[0]}" in resumed.stderr
  assert "step 400/400" in resumed.stderr


@pytest.mark.slow
def test_kill_minus_9_during_async_save_never_restores_a_partial_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  # ~25M parameters: with Adam's two moments a save writes ~300 MB, which takes a moment.
  proc = start_jaxlm("train", "--config", SMOKE, "--workdir", str(workdir),
                     "--config.model.d_model=512", "--config.model.n_layer=8",
                     "--config.model.n_head=8", "--config.train.steps=1000",
                     "--config.checkpoint.every=4", "--config.train.eval_every=0",
                     "--config.train.log_every=1")
  killed_during = None
  try:
    deadline = time.time() + 300
    while time.time() < deadline and killed_during is None:
      if ckpt_dir.is_dir():
        complete = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
        partial = [p.name for p in ckpt_dir.iterdir() if "tmp" in p.name]
        if complete and partial:  # A second save is being written: kill it mid-write.
          os.kill(proc.pid, signal.SIGKILL)
          killed_during = (complete, partial)
      time.sleep(0.002)
    proc.wait(timeout=60)
  finally:
    proc.kill()
    proc.stderr.close()
  assert killed_during, "never caught a save in progress"
  _, partial = killed_during
  partial_step = int(partial[0].split(".")[0])
  # The interrupted save is not a checkpoint: only committed saves are listed.
  listed = checkpoint_lib.Checkpointer(str(ckpt_dir), read_only=True).all_steps()
  assert listed and partial_step not in listed
  latest_complete = max(listed)
  resumed = run_jaxlm("train", "--config", SMOKE, "--workdir", str(workdir),
                      "--config.model.d_model=512", "--config.model.n_layer=8",
                      "--config.model.n_head=8", "--config.train.steps=1000",
                      "--config.checkpoint.every=4", "--config.train.eval_every=0",
                      "--config.train.log_every=1", "--config.train.stop_at="
                      f"{latest_complete + 1}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from checkpoint at step {latest_complete}" in resumed.stderr
  assert not [p for p in ckpt_dir.iterdir() if "tmp" in p.name]  # The partial one was removed.


def trained_smoke(tmp_path, name="run", *extra):
  workdir = str(tmp_path / name)
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=5",
                   "--config.train.eval_every=0", *extra)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def snapshot(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, workdir)] = open(p, "rb").read()
  return out


@pytest.mark.slow
def test_bad_checkpoint_inputs_are_one_line_errors_and_change_nothing(tmp_path):
  workdir = trained_smoke(tmp_path)
  before = snapshot(workdir)

  # Same workdir, another model shape: refuse; init_from cannot serve it (issue 23, item 17).
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", workdir, "--config.model.n_layer=3")
  line = assert_one_line_error(proc, "model.n_layer=2", "new workdir")
  assert "--config.train.init_from" not in line

  # Fine-tuning from a run of another shape: name the parameter and both shapes.
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", str(tmp_path / "ft"),
                   "--config.model.d_model=64", f"--config.train.init_from={workdir}")
  assert_one_line_error(proc, "another shape",
                        "h_0/attn/key_value/bias is (2, 4, 8) there but (2, 4, 16) here")

  # A step that does not exist: list the ones that do.
  proc = run_jaxlm("eval", "--workdir", workdir, "--step", "3")
  assert_one_line_error(proc, "no checkpoint at step 3", "available steps: 5")
  proc = run_jaxlm("eval", "--workdir", workdir, "--eval_steps", "0")
  assert_one_line_error(proc, "--eval_steps must be >= 1, got 0")

  # No checkpoint at all.
  os.makedirs(tmp_path / "empty")
  proc = run_jaxlm("eval", "--workdir", str(tmp_path / "empty"))
  assert_one_line_error(proc, "no run in")
  assert snapshot(workdir) == before  # Nothing already saved was modified.


@pytest.mark.slow
def test_init_from_fine_tunes_from_another_runs_params(tmp_path):
  source = trained_smoke(tmp_path, "source")
  tuned = trained_smoke(tmp_path, "tuned", f"--config.train.init_from={source}",
                        "--config.train.stop_at=0", "--config.train.steps=0")
  a, b = runs.load_run(source).params, runs.load_run(tuned).params
  jax.tree.map(np.testing.assert_array_equal, a, b)  # Step 0 of the new run = the source.


def test_unreadable_or_read_only_checkpoint_directory(tmp_path):
  as_file = tmp_path / "file"
  as_file.write_text("x")
  with pytest.raises(JaxlmError, match="is not a directory"):
    checkpoint_lib.Checkpointer(str(as_file))
  ro = tmp_path / "ro"
  ro.mkdir()
  # Root ignores permission bits, so make the directory truly read-only: a read-only bind
  # mount inside a private user + mount namespace (no privileges needed, nothing leaks out).
  probe = (
      "import sys; from jaxlm import checkpoint; from jaxlm.errors import JaxlmError\n"
      "try:\n"
      "  checkpoint.Checkpointer(sys.argv[1])\n"
      "except JaxlmError as e:\n"
      "  print(e); sys.exit(3)\n")
  cmd = ["unshare", "-rm", "sh", "-c",
         'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3" "$1"',
         "sh", str(ro), sys.executable, probe]
  if os.geteuid() != 0:
    os.chmod(ro, 0o555)
    cmd = [sys.executable, "-c", probe, str(ro)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert "is not writable" in proc.stdout
