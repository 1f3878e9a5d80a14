"""Issue 23, items 11, 12, 15 and part of 17: damaged checkpoints and `jaxlm convert`.

A damaged checkpoint (a missing item or metadata file, a truncated array file, a step
half-deleted by a killed garbage collection) is never listed or restored: train and eval fall
back to the newest good step with a warning naming the damaged one, an explicit --step names
the good ones. An optimizer change on resume is named as such. `convert` turns truncated
safetensors, malformed or incomplete config.json, NaN weights and a bad --out into one line,
and a kill -9 during an import does not block its rerun.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, REPO, assert_one_line_error, run_jaxlm
from hf_test import gpt2, save

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import hf
from jaxlm.errors import JaxlmError

SMOKE = os.path.join(CONFIGS, "smoke.py")


# --- 12. Damaged checkpoints: never listed, never restored; fall back to the newest good one -----
def three_steps(directory):
  ckpt = checkpoint_lib.Checkpointer(str(directory), keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, {"params": {"w": jnp.full((4, 8), float(step))},
                     "opt_state": {"mu": jnp.zeros((4, 8))}}, {}, val_loss=4.0 - step)
  ckpt.wait()
  ckpt.close()
  return {"params": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
          "opt_state": {"mu": jax.ShapeDtypeStruct((4, 8), jnp.float32)}}


def truncate_arrays(step_dir, item="params"):
  """Halves every OCDBT data file of the item: the per-process ones and the merged root's."""
  for data in (os.path.join(step_dir, item, "ocdbt.process_0", "d"),
               os.path.join(step_dir, item, "d")):
    for name in os.listdir(data):
      path = os.path.join(data, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "meta missing": lambda d: shutil.rmtree(os.path.join(d, "meta")),
    "params missing": lambda d: shutil.rmtree(os.path.join(d, "params")),
    "opt_state missing": lambda d: shutil.rmtree(os.path.join(d, "opt_state")),
    "params metadata missing": lambda d: os.remove(os.path.join(d, "params", "_METADATA")),
    "checkpoint metadata missing": lambda d: os.remove(os.path.join(d, "_CHECKPOINT_METADATA")),
    "array file emptied": lambda d: [open(os.path.join(d, "params", "ocdbt.process_0", "d", n),
                                          "w").close() for n in
                                     os.listdir(os.path.join(d, "params", "ocdbt.process_0", "d"))],
    "array files truncated": truncate_arrays,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_step_is_skipped_for_the_newest_good_one(tmp_path, damage):
  targets = three_steps(tmp_path / "c")
  DAMAGE[damage](str(tmp_path / "c" / "3"))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), read_only=True)
  cheap = damage != "array files truncated"  # Found without reading an array.
  if cheap:
    assert ckpt.all_steps() == [1, 2] and list(ckpt.damaged()) == [3]
  restored, step = ckpt.restore_good("latest", targets)
  assert step == 2 and float(restored["params"]["w"][0, 0]) == 2.0
  assert ckpt.all_steps() == [1, 2] and list(ckpt.damaged()) == [3]
  assert ckpt.resolve_step("best") == 2  # Step 3 had the lowest val loss, but is damaged.
  # Asked for by number: one line naming the damage and the good steps, not a model mismatch.
  with pytest.raises(JaxlmError, match=r"checkpoints?.*/3 is damaged \(.*\); good steps: 1, 2"):
    ckpt.restore_good(3, targets)
  ckpt.close()


def test_every_step_damaged_is_one_line_naming_each(tmp_path):
  targets = three_steps(tmp_path / "c")
  for step in (1, 2, 3):
    shutil.rmtree(tmp_path / "c" / str(step) / "params")
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), read_only=True)
  with pytest.raises(JaxlmError, match=r"every checkpoint in .* is damaged: step 1 \(its params "
                     r"directory is missing\); step 2 .*; step 3 .*new workdir"):
    ckpt.restore_good("latest", targets)
  ckpt.close()


def test_a_resumed_run_sets_a_damaged_step_aside_before_it_saves(tmp_path):
  targets = three_steps(tmp_path / "c")
  truncate_arrays(str(tmp_path / "c" / "3"))
  before = sorted(os.listdir(tmp_path / "c" / "3" / "params" / "ocdbt.process_0" / "d"))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=2)
  _, step = ckpt.restore_good("latest", targets)
  assert step == 2 and os.path.isdir(tmp_path / "c" / "3")  # Nothing moves before a save.
  ckpt.save(3, {"params": {"w": jnp.ones((4, 8))}, "opt_state": {"mu": jnp.ones((4, 8))}}, {},
            val_loss=0.5)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3] and ckpt.damaged() == {}
  ckpt.close()
  # The damaged step is kept for a look, under a name no listing takes for a step.
  kept = tmp_path / "c" / "3.damaged" / "params" / "ocdbt.process_0" / "d"
  assert sorted(os.listdir(kept)) == before


KILL_DURING_GC = textwrap.dedent("""
  import os, signal, sys
  import jax.numpy as jnp
  from jaxlm import checkpoint as checkpoint_lib
  directory = sys.argv[1]
  ckpt = checkpoint_lib.Checkpointer(directory, keep=1, keep_best=False)
  tree = {"params": {"w": jnp.ones((64, 64)), "b": jnp.ones((64,))}}
  ckpt.save(1, tree, {})
  ckpt.wait()
  real_unlink, seen = os.unlink, [0]

  def unlink(path, *a, **kw):  # kill -9 on the third file deleted under the checkpoints.
    real_unlink(path, *a, **kw)
    if str(path).startswith(directory) or kw.get("dir_fd") is not None:  # shutil.rmtree's.
      seen[0] += 1
      if seen[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)

  os.unlink = unlink
  ckpt.save(2, tree, {})  # keep=1: deletes step 1 once step 2 is written.
  ckpt.wait()
  ckpt.close()
""")


def test_kill_9_during_garbage_collection_leaves_no_half_deleted_step_listed(tmp_path):
  directory = str(tmp_path / "c")
  proc = subprocess.run([sys.executable, "-c", KILL_DURING_GC, directory], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == -9, proc.stderr[-2000:]  # Killed mid-deletion, as intended.
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  complete = [s for s in steps if checkpoint_lib.inspect(checkpoint_lib.epath.Path(directory)
                                                         / str(s)) is None]
  # Every step directory left under a step's name is whole (the half-deleted one, if any, is
  # under checkpoints/deleting), and the next start empties the trash.
  assert steps == complete and steps, os.listdir(directory)
  ckpt = checkpoint_lib.Checkpointer(directory)
  assert not os.listdir(os.path.join(directory, checkpoint_lib.TRASH))
  target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32),
            "b": jax.ShapeDtypeStruct((64,), jnp.float32)}
  for step in ckpt.all_steps():
    assert float(ckpt.restore(step, {"params": target})["params"]["w"].sum()) == 64 * 64
  ckpt.close()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """A 20-step smoke run with checkpoints at 10 and 20 (copy it before damaging it)."""
  workdir = str(tmp_path_factory.mktemp("smoke") / "w")
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=20",
                   "--config.train.eval_every=10", "--config.sample.max_new_tokens=4")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def copy_of(run, tmp_path):
  shutil.copytree(run, tmp_path / "w")
  return str(tmp_path / "w")


@pytest.mark.slow
def test_eval_falls_back_past_a_truncated_latest_and_names_it(smoke_run, tmp_path):
  workdir = copy_of(smoke_run, tmp_path)
  truncate_arrays(os.path.join(workdir, "checkpoints", "20"))
  proc = run_jaxlm("eval", "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert f"step 10 of {workdir}" in proc.stdout
  assert "checkpoints/20 is damaged" in proc.stderr
  line = assert_one_line_error(run_jaxlm("eval", "--workdir", workdir, "--step", "20"),
                               "checkpoints/20 is damaged", "good steps: 10")
  assert "TensorStore details" not in line


@pytest.mark.slow
def test_train_resumes_from_the_newest_good_step_and_keeps_the_damaged_one(smoke_run, tmp_path):
  workdir = copy_of(smoke_run, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "20", "opt_state"))
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=20",
                   "--config.train.eval_every=10", "--config.sample.max_new_tokens=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoints/20 is damaged (its opt_state directory is missing)" in proc.stderr
  assert "resumed from checkpoint at step 10" in proc.stderr
  ckpts = os.path.join(workdir, "checkpoints")
  assert sorted(set(os.listdir(ckpts)) - {checkpoint_lib.TRASH}) == ["10", "20", "20.damaged"]
  assert checkpoint_lib.inspect(checkpoint_lib.epath.Path(ckpts) / "20") is None


# --- 17. An optimizer change on resume is named, not reported as an opt_state mismatch ----------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "muon"])
def test_resuming_with_another_optimizer_names_the_change(smoke_run, tmp_path, name):
  workdir = copy_of(smoke_run, tmp_path)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  proc = run_jaxlm("train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=30",
                   f"--config.optim.name={name}")
  # resume.py's table refuses the change by name before any state is read (the opt_state
  # check in train.check_optimizer stays behind it for changes the table lets through).
  assert_one_line_error(proc, f"optim.name='adamw' but the config says '{name}'", "init_from")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


# --- 15 and 11. convert: damaged input, NaN weights, a bad --out, a killed import ---------------
@pytest.fixture
def hf_dir(tmp_path):
  save(gpt2(), tmp_path / "hf")
  return tmp_path / "hf"


def test_truncated_safetensors_is_one_line(hf_dir, tmp_path):
  path = hf_dir / "model.safetensors"
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(JaxlmError, match="model.safetensors is truncated or damaged"):
    hf.read_hf(str(hf_dir))
  assert_one_line_error(run_jaxlm("convert", "--from_hf", str(hf_dir), "--workdir",
                                  str(tmp_path / "w")), "truncated or damaged")
  assert not os.path.exists(tmp_path / "w")


def test_truncated_safetensors_header_is_one_line(hf_dir):
  path = hf_dir / "model.safetensors"
  with open(path, "r+b") as f:
    f.truncate(5)
  with pytest.raises(JaxlmError, match="model.safetensors is truncated or damaged"):
    hf.read_hf(str(hf_dir))


def test_malformed_config_json_is_one_line(hf_dir):
  text = (hf_dir / "config.json").read_text()
  (hf_dir / "config.json").write_text(text[: len(text) // 2])
  with pytest.raises(JaxlmError, match=r"config.json is not valid JSON \(.* at line \d+"):
    hf.read_hf(str(hf_dir))
  (hf_dir / "config.json").write_text("[1, 2]")
  with pytest.raises(JaxlmError, match="config.json holds a JSON list, not an object"):
    hf.read_hf(str(hf_dir))


def test_a_missing_config_key_is_named(hf_dir):
  cfg = json.loads((hf_dir / "config.json").read_text())
  del cfg["n_embd"]
  (hf_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(JaxlmError, match="config.json lacks 'n_embd'"):
    hf.read_hf(str(hf_dir))


def test_a_malformed_index_is_one_line(hf_dir):
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
  with pytest.raises(JaxlmError, match="has no \"weight_map\""):
    hf.read_hf(str(hf_dir))


def test_nan_weights_are_refused_and_nothing_is_written(hf_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  path = str(hf_dir / "model.safetensors")
  tensors = load_file(path)
  tensors["transformer.h.1.mlp.c_fc.weight"][0, :3] = [np.nan, np.inf, np.nan]
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(JaxlmError, match=r"tensor transformer.h.1.mlp.c_fc.weight in .* holds 2 "
                     r"NaN and 1 infinite value\(s\) of [\d,]+"):
    hf.import_hf(str(hf_dir), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_export_refuses_nan_params_before_writing(hf_dir, tmp_path, monkeypatch):
  hf.import_hf(str(hf_dir), str(tmp_path / "w"))
  load = hf.load_workdir

  def with_nan(workdir):
    mcfg, params = load(workdir)
    params = jax.tree.map(np.array, params)
    params["wte"]["embedding"][3, 1] = np.nan
    return mcfg, params

  monkeypatch.setattr(hf, "load_workdir", with_nan)
  with pytest.raises(JaxlmError, match="wte/embedding of the latest checkpoint holds 1 NaN"):
    hf.export_hf(str(tmp_path / "w"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_export_out_a_file_or_a_model_is_refused_and_kept(hf_dir, tmp_path):
  hf.import_hf(str(hf_dir), str(tmp_path / "w"))
  (tmp_path / "file").write_text("mine")
  assert_one_line_error(run_jaxlm("convert", "--to_hf", "--workdir", str(tmp_path / "w"),
                                  "--out", str(tmp_path / "file")), "is a file")
  assert (tmp_path / "file").read_text() == "mine"
  before = {f: (hf_dir / f).read_bytes() for f in os.listdir(hf_dir)}
  with pytest.raises(JaxlmError, match="already holds a model.*config.json"):
    hf.export_hf(str(tmp_path / "w"), str(hf_dir))
  assert {f: (hf_dir / f).read_bytes() for f in os.listdir(hf_dir)} == before


def test_an_import_killed_mid_save_can_be_rerun(hf_dir, tmp_path):
  # What a kill -9 during the save leaves: config.json and orbax's tmp directory, no step.
  hf.import_hf(str(hf_dir), str(tmp_path / "w"))
  ckpts = tmp_path / "w" / "checkpoints"
  os.rename(ckpts / "0", ckpts / "0.orbax-checkpoint-tmp-1796195000123456")
  result = hf.import_hf(str(hf_dir), str(tmp_path / "w"))
  assert result["family"] == "gpt2"
  assert sorted(os.listdir(ckpts)) == ["0"]
  with pytest.raises(JaxlmError, match="already holds checkpoints"):
    hf.import_hf(str(hf_dir), str(tmp_path / "w"))
