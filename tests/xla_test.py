"""The config's XLA flags: what "auto" means, that they reach XLA, and that they keep the math."""

import json
import os
import subprocess
import sys

import jax
import jaxlib
import pytest
from conftest import CONFIGS, REPO, assert_one_line_error, run_jaxlm

from jaxlm.errors import JaxlmError
from jaxlm.host import xla


def test_resolve_auto_empty_and_explicit_flags():
  version = ".".join(jaxlib.__version__.split(".")[:2])
  assert xla.resolve("auto") == xla.TESTED_FLAGS.get(version, ())
  assert xla.resolve("") == ()
  assert xla.resolve(" --xla_a=1   --xla_b=x,y ") == ("--xla_a=1", "--xla_b=x,y")
  with pytest.raises(JaxlmError, match="'-O3' is not an XLA flag"):
    xla.resolve("--xla_a=1 -O3")


def test_user_flags_win_and_a_started_backend_is_left_alone(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla.apply("--xla_cpu_experimental_ynn_fusion_type=") == ()  # The user's value stays.
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  jax.devices()  # The backend of this test process has started: XLA reads no more flags.
  monkeypatch.setenv("XLA_FLAGS", "")
  assert xla.apply("--xla_cpu_enable_fast_math=false") == ()
  assert os.environ["XLA_FLAGS"] == ""
  assert xla.original_env() is None  # Nothing was added, so nothing to undo for the peak.


# One train step of the default experiment's model in a fresh process, with the config's
# xla_flags applied first: its loss, a checksum of the updated params, and whether the
# compiled step still contains YNNPACK fusions.
STEP_SCRIPT = """
import json, sys
from jaxlm.host import xla
added = xla.apply(sys.argv[1])
import jax, numpy as np
from jaxlm import build as build_lib
from jaxlm import optim, sharding
from jaxlm import model as model_lib
mcfg = model_lib.ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=128)
model = model_lib.make_model(mcfg)
opt = optim.make_optimizer(__import__("jaxlm.defaults").defaults.base_config().optim, 100)
mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
training = build_lib.make_sharded_training(model, opt, mesh, sharding.get_rules("fsdp"))
state = training.init(jax.random.key(0))
tokens = np.random.default_rng(0).integers(0, 65, (1, 12, 65)).astype(np.int32)
batch = sharding.host_to_global({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]},
                                training.batch_sharding)
step = training.steps.lower(state, batch, jax.random.key(1)).compile()
for _ in range(3):
  state, m = step(state, batch, jax.random.key(1))
leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
print(json.dumps({"added": added, "loss": float(m["loss"][0]),
                  "param_sum": float(sum(np.sum(np.abs(x)) for x in leaves)),
                  "ynn": "__ynn_fusion" in step.as_text(),
                  "reduce_window": "reduce-window(" in step.as_text()}))
"""


def _run_step(xla_flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, xla_flags], capture_output=True,
                        text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_flags_reach_xla_and_keep_the_math():
  plain, tuned = _run_step(""), _run_step("auto")
  assert plain["added"] == []
  assert tuned["added"] == list(xla.resolve("auto"))
  if "--xla_cpu_experimental_ynn_fusion_type=" in tuned["added"]:
    # The flag took effect: XLA's default hands work to YNNPACK, the tuned step does not.
    assert jax.default_backend() != "cpu" or plain["ynn"]
    assert not tuned["ynn"]
  if "--xla_disable_hlo_passes=tree_reduction_rewriter" in tuned["added"]:
    # XLA's CPU pipeline splits long reductions into reduce-windows; the tuned step has none.
    assert jax.default_backend() != "cpu" or plain["reduce_window"]
    assert not tuned["reduce_window"]
  # Three AdamW steps: the same loss and parameters up to float32 summation order.
  assert tuned["loss"] == pytest.approx(plain["loss"], rel=1e-5)
  assert tuned["param_sum"] == pytest.approx(plain["param_sum"], rel=1e-6)


def test_bad_xla_flags_in_the_config_are_one_line():
  proc = run_jaxlm("bench", "--config", os.path.join(CONFIGS, "smoke.py"),
                   "--config.xla_flags=-O3")
  assert_one_line_error(proc, "xla_flags", "'-O3' is not an XLA flag")


def test_compile_cache_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "f").write_text("")
  proc = run_jaxlm("train", "--config", os.path.join(CONFIGS, "smoke.py"), "--workdir",
                   str(tmp_path / "run"), f"--config.compile_cache={tmp_path / 'f'}")
  assert_one_line_error(proc, "compile_cache=", "is a file, not a directory")


def test_train_fills_the_compile_cache_and_a_rerun_reads_it(tmp_path):
  cache = tmp_path / "xla-cache"
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  args = [sys.executable, "-m", "jaxlm.cli", "train", "--config",
          os.path.join(CONFIGS, "smoke.py"), f"--config.compile_cache={cache}",
          "--config.train.steps=2"]
  first = subprocess.run([*args, "--workdir", str(tmp_path / "a")], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  entries = sorted(p.name for p in cache.iterdir())
  assert any(name.startswith("jit_train_step") for name in entries), entries
  # The same programs again (another workdir): loaded from the cache, nothing new written.
  second = subprocess.run([*args, "--workdir", str(tmp_path / "b")], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert sorted(p.name for p in cache.iterdir()) == entries
