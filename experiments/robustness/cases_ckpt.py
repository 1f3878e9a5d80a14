"""Items 11, 12, 15 and 17 (optimizer change): damaged checkpoints, GC killed, convert input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import textwrap

from harness import Case, jaxlm, train_smoke

SM = ["--config", "{SM}", "--workdir", "{W}"]


def ckpts(w: str) -> str:
  return os.path.join(w, "checkpoints")


def truncate_arrays(w: str, step: int = 30, item: str = "params") -> None:
  for data in (os.path.join(ckpts(w), str(step), item, "ocdbt.process_0", "d"),
               os.path.join(ckpts(w), str(step), item, "d")):
    for name in os.listdir(data):
      path = os.path.join(data, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def digest(w: str) -> str:
  """Every file under checkpoints/ (names and bytes): what an eval must leave as it was."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(ckpts(w))):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(path.encode())
      h.update(open(path, "rb").read())
  return h.hexdigest()


def damaged_run(damage):
  def prepare(w: str) -> None:
    train_smoke(w)
    damage(w)
    with open(os.path.join(os.path.dirname(w), "digest"), "w") as f:
      f.write(digest(w))
  return prepare


def unchanged(w: str, result) -> str | None:
  with open(os.path.join(os.path.dirname(w), "digest")) as f:
    return None if f.read() == digest(w) else "checkpoints changed"


def set_aside(w: str, result) -> str | None:
  names = sorted(set(os.listdir(ckpts(w))) - {"deleting"})
  return None if "30.damaged" in names else f"checkpoints hold {names}"


rm = lambda *parts: lambda w: shutil.rmtree(os.path.join(ckpts(w), *parts))  # noqa: E731

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
  def unlink(path, *a, **kw):
    real_unlink(path, *a, **kw)
    if str(path).startswith(directory) or kw.get("dir_fd") is not None:
      seen[0] += 1
      if seen[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
  os.unlink = unlink
  ckpt.save(2, tree, {})
  ckpt.wait()
""")


def no_half_deleted_step(w: str, result) -> str | None:
  from etils import epath

  from jaxlm import checkpoint as checkpoint_lib
  steps = [s for s in os.listdir(ckpts(w)) if s.isdigit()]
  broken = [s for s in steps if checkpoint_lib.inspect(epath.Path(ckpts(w)) / s)]
  return f"half-deleted step(s) {broken} listed" if broken or not steps else None


# --- convert ----------------------------------------------------------------------------------
def hf_dir(w: str) -> str:
  return os.path.join(os.path.dirname(w), "hf")


def tiny_gpt2(w: str, *, damage=None) -> None:
  import torch
  import transformers
  cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir(w))
  os.makedirs(w, exist_ok=True)  # So {W}/../hf resolves.
  if damage:
    damage(hf_dir(w))


def hf_prepare(damage=None):
  return lambda w: tiny_gpt2(w, damage=damage)


def truncate_safetensors(d: str) -> None:
  path = os.path.join(d, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def cut_config(d: str) -> None:
  path = os.path.join(d, "config.json")
  text = open(path).read()
  open(path, "w").write(text[: len(text) // 2])


def drop_key(d: str) -> None:
  path = os.path.join(d, "config.json")
  cfg = json.load(open(path))
  del cfg["n_embd"]
  json.dump(cfg, open(path, "w"))


def nan_weight(d: str) -> None:
  from safetensors.numpy import load_file, save_file
  path = os.path.join(d, "model.safetensors")
  tensors = load_file(path)
  tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
  save_file(tensors, path, metadata={"format": "pt"})


def imported_then_killed(w: str) -> None:
  """An import, then what a kill -9 mid-save leaves: orbax's tmp directory and no step."""
  import subprocess
  import sys
  tiny_gpt2(w)
  subprocess.run([os.path.join(os.path.dirname(sys.executable), "jaxlm"), "convert",
                  "--from_hf", hf_dir(w), "--workdir", w], check=True, capture_output=True)
  os.rename(os.path.join(ckpts(w), "0"), os.path.join(ckpts(w), "0.orbax-checkpoint-tmp-17"))


def imported_with_out_file(w: str) -> None:
  imported_then_killed(w)
  shutil.rmtree(ckpts(w))
  import subprocess
  import sys
  subprocess.run([os.path.join(os.path.dirname(sys.executable), "jaxlm"), "convert",
                  "--from_hf", hf_dir(w), "--workdir", w], check=True, capture_output=True)
  open(os.path.join(os.path.dirname(w), "out"), "w").write("mine")


def workdir_absent(w: str, result) -> str | None:
  return "workdir written" if os.path.exists(os.path.join(w, "config.json")) else None


def has_step_0(w: str, result) -> str | None:
  return None if os.path.isdir(os.path.join(ckpts(w), "0")) else "no step 0"


def out_kept(w: str, result) -> str | None:
  return None if open(os.path.join(os.path.dirname(w), "out")).read() == "mine" else "overwritten"


CASES = [
    Case("eval: truncated latest falls back to the newest good step", 12,
         jaxlm("eval", "--workdir", "{W}"), expect_rc=(0,),
         prepare=damaged_run(truncate_arrays), check=unchanged,
         expect_in_output=("checkpoints/30 is damaged", "step 20 of")),
    Case("eval: --step of a truncated step names the good ones", 12,
         jaxlm("eval", "--workdir", "{W}", "--step", "30"),
         prepare=damaged_run(truncate_arrays), check=unchanged,
         expect_in_output=("good steps: 10, 20",)),
    Case("eval: missing meta falls back", 12, jaxlm("eval", "--workdir", "{W}"),
         expect_rc=(0,), prepare=damaged_run(rm("30", "meta")), check=unchanged,
         expect_in_output=("its meta directory is missing", "step 20 of")),
    Case("eval --step 30: missing params metadata is damage, not a mismatch", 17,
         jaxlm("eval", "--workdir", "{W}", "--step", "30"),
         prepare=damaged_run(lambda w: os.remove(os.path.join(ckpts(w), "30", "params",
                                                              "_METADATA"))),
         check=unchanged, expect_in_output=("params/_METADATA is missing",)),
    Case("sample: missing params falls back", 12,
         jaxlm("sample", "--workdir", "{W}", "--max_new_tokens", "4"), expect_rc=(0,),
         prepare=damaged_run(rm("30", "params")), check=unchanged,
         expect_in_output=("its params directory is missing",)),
    Case("train: missing opt_state resumes from the newest good step", 12,
         jaxlm("train", *SM, "--config.train.steps=40"), expect_rc=(0,),
         prepare=damaged_run(rm("30", "opt_state")), check=set_aside,
         expect_in_output=("resumed from checkpoint at step 20",)),
    Case("kill -9 during checkpoint garbage collection", 12,
         ["{PY}", "-c", KILL_DURING_GC, "{W}/checkpoints"], expect_rc=(-9,),
         max_error_lines=99, check=no_half_deleted_step),
    Case("train: resume with optim.name=sgd names the optimizer change", 17,
         jaxlm("train", *SM, "--config.optim.name=sgd", "--config.train.steps=40"),
         prepare=damaged_run(lambda w: None), check=unchanged,
         expect_in_output=("optim.name='adamw' but the config says 'sgd'",)),
    Case("convert: truncated safetensors", 15,
         jaxlm("convert", "--from_hf", "{W}/../hf", "--workdir", "{W}"),
         prepare=hf_prepare(truncate_safetensors), check=workdir_absent,
         expect_in_output=("truncated or damaged",)),
    Case("convert: malformed config.json", 15,
         jaxlm("convert", "--from_hf", "{W}/../hf", "--workdir", "{W}"),
         prepare=hf_prepare(cut_config), check=workdir_absent,
         expect_in_output=("is not valid JSON",)),
    Case("convert: config.json lacks a key", 15,
         jaxlm("convert", "--from_hf", "{W}/../hf", "--workdir", "{W}"),
         prepare=hf_prepare(drop_key), check=workdir_absent, expect_in_output=("'n_embd'",)),
    Case("convert: NaN weights are refused", 11,
         jaxlm("convert", "--from_hf", "{W}/../hf", "--workdir", "{W}"),
         prepare=hf_prepare(nan_weight), check=workdir_absent, expect_in_output=("1 NaN",)),
    Case("convert --to_hf: --out an existing file", 15,
         jaxlm("convert", "--to_hf", "--workdir", "{W}", "--out", "{W}/../out"),
         prepare=imported_with_out_file, check=out_kept, expect_in_output=("is a file",)),
    Case("convert --from_hf rerun after a kill -9 mid-save", 15,
         jaxlm("convert", "--from_hf", "{W}/../hf", "--workdir", "{W}"), expect_rc=(0,),
         prepare=imported_then_killed, check=has_step_0,
         expect_in_output=("imported a gpt2",)),
]
