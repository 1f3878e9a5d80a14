"""Issue 21: model.attention_impl and model.dtype=auto.

Every kernel this machine can run (einsum, xla, and splash in Pallas' interpreter) gives the
einsum path's logits and gradients, in training and in KV-cache decoding; "auto" keeps the
einsum path on a CPU, asks for cuDNN on a (mocked) NVIDIA GPU and falls back to xla with a log
line when cuDNN cannot run; explicit choices that cannot run here are one-line errors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from conftest import assert_one_line_error, load_config, random_model, run_jaxlm

from jaxlm import attention, devices
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

BASE = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, d_model=32)
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False,
             tie_embeddings=False, d_ff=64)
CASES = {
    "gpt2": {},
    "llama_gqa": {**LLAMA, "n_kv_head": 2},
    "windows": {"attention_window": "5,full", "qk_norm": True, "logit_softcap": 3.0},
    # Scanned with different windows per layer: the fused kernels get an explicit mask.
    "scanned_windows": {**LLAMA, "scan_layers": True, "attention_window": "3,7"},
}


def logits_and_grads(model, params, tokens):
  def f(p):
    return model.apply({"params": p}, tokens)
  out = f(params)
  weights_V = jnp.cos(jnp.arange(out.shape[-1]))  # Every logit matters, each differently.
  grads = jax.grad(lambda p: (f(p) * weights_V[None, None, :]).mean())(params)
  return out, grads


def assert_same(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def twin(model, params, impl, **overrides):
  """The same weights under another attention kernel (and block size, for splash)."""
  cfg = dataclasses.replace(model.cfg, attention_impl=impl, **overrides)
  return model_lib.make_model(cfg), params


@pytest.mark.parametrize("case", CASES)
def test_xla_gives_the_einsum_paths_logits_and_gradients(case):
  model, params = random_model(BASE, **CASES[case])
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 40)
  want = logits_and_grads(model, params, tokens)
  got = logits_and_grads(*twin(model, params, "xla"), tokens)
  assert_same(got, want)


def test_einsum_with_query_blocks_is_unchanged_by_the_new_option():
  """attention_impl defaults to einsum in a ModelConfig: today's path, bit for bit."""
  model, params = random_model(BASE, attention_block=4)
  assert model.cfg.attention_impl == "einsum"
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 40)
  plain = model_lib.make_model(dataclasses.replace(model.cfg, attention_block=0))
  assert_same(logits_and_grads(model, params, tokens),
              logits_and_grads(plain, params, tokens), tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "llama_gqa", "windows"])
def test_splash_in_the_interpreter_gives_the_einsum_paths_logits_and_gradients(case):
  base = {**BASE, "block_size": 128, "d_model": 64, "n_head": 2}
  model, params = random_model(base, **CASES[case])
  tokens = jax.random.randint(jax.random.key(3), (1, 128), 0, 40)
  want = logits_and_grads(model, params, tokens)
  got = logits_and_grads(*twin(model, params, "splash"), tokens)
  assert_same(got, want, tol=5e-5)


@pytest.mark.parametrize("impl", ["einsum", "xla", "splash"])
@pytest.mark.parametrize("case", ["llama_gqa", "windows", "scanned_windows"])
def test_cached_decoding_equals_the_full_forward_with_each_kernel(impl, case):
  model, params = random_model(BASE, **CASES[case])
  model, params = twin(model, params, impl)
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 16), 0, 40))
  full = model.apply({"params": params}, tokens) if impl != "splash" else None
  if impl == "splash":  # Training splash needs 128-multiples; decoding runs through xla.
    full = model_lib.make_model(dataclasses.replace(model.cfg, attention_impl="einsum")).apply(
        {"params": params}, tokens)
  apply = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, positions_BxL=pos, cache=c))
  cache = model_lib.init_cache(model.cfg, 2)
  # A prompt of 5 tokens at once, then one token per call.
  out, cache = apply(params, tokens[:, :5], np.broadcast_to(np.arange(5), (2, 5)), cache)
  got = [out]
  for t in range(5, 16):
    out, cache = apply(params, tokens[:, t:t + 1], np.full((2, 1), t), cache)
    got.append(out)
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-5, rtol=2e-5)


# --- Resolution ---------------------------------------------------------------------------------
CPU = attention.Platform("cpu")
HOPPER = attention.Platform("gpu", nvidia=True, compute_capability=9.0)
AMPERE = attention.Platform("gpu", nvidia=True, compute_capability=8.0)
TPU = attention.Platform("tpu")


def resolve(impl, platform, *, head_dim=64, dtype="bfloat16", block_size=1024, dropout=0.0,
            mixed_windows=False):
  return attention.resolve(impl, head_dim=head_dim, dtype=dtype, block_size=block_size,
                           dropout=dropout, mixed_windows=mixed_windows, platform=platform)


def test_auto_keeps_the_einsum_path_on_a_cpu():
  assert resolve("auto", CPU, dtype="float32") == "einsum"
  cfg = load_config("smoke")
  assert cfg.model.attention_impl == "auto" and cfg.model.dtype == "auto"
  mcfg = config_lib.model_config(cfg, 65)
  assert (mcfg.attention_impl, mcfg.dtype) == ("einsum", "float32")


def test_auto_asks_for_cudnn_on_an_nvidia_gpu(monkeypatch):
  asked = []
  monkeypatch.setattr(attention, "probe_cudnn", lambda k, d: asked.append((k, d)))
  assert resolve("auto", HOPPER) == "cudnn"
  assert asked == [(64, "bfloat16")]


def test_auto_falls_back_to_xla_with_a_log_line_when_cudnn_raises(monkeypatch):
  """On this CPU machine the cuDNN probe really raises (no cuDNN): auto must not."""
  lines = []
  monkeypatch.setattr(logging, "info", lambda fmt, *a: lines.append(fmt % a))
  assert resolve("auto", HOPPER) == "xla"
  assert len(lines) == 1 and "auto fell back" in lines[0] and "cuDNN" in lines[0], lines


@pytest.mark.parametrize("kwargs, why", [
    (dict(dtype="float32"), "takes model.dtype bfloat16 or float16"),
    (dict(head_dim=12), "multiple of 8 up to 256"),
    (dict(dropout=0.1), "no attention dropout"),
    (dict(mixed_windows=True), "one window per compiled layer"),
])
def test_auto_falls_back_for_what_cudnn_cannot_take(monkeypatch, kwargs, why):
  monkeypatch.setattr(attention, "probe_cudnn", lambda k, d: None)
  lines = []
  monkeypatch.setattr(logging, "info", lambda fmt, *a: lines.append(fmt % a))
  assert resolve("auto", HOPPER, **kwargs) == "xla"
  assert why in lines[0]


def test_auto_picks_splash_on_a_tpu_when_the_shapes_allow():
  assert resolve("auto", TPU, head_dim=128) == "splash"
  assert resolve("auto", TPU, head_dim=64) == "xla"


@pytest.mark.parametrize("impl, platform, kwargs, why", [
    ("cudnn", CPU, {}, "cuDNN attention needs an NVIDIA GPU; this machine's backend is cpu"),
    ("splash", CPU, {}, "splash attention needs a TPU"),
    ("cudnn", AMPERE, dict(head_dim=160), "a multiple of 8 up to 128 on this GPU; the model's "
     "is 160"),
    ("splash", TPU, dict(head_dim=64), "multiples of 128"),
    ("flash", CPU, {}, "is not one of auto, einsum, xla, cudnn, splash"),
])
def test_explicit_choices_that_cannot_run_are_one_line_errors(impl, platform, kwargs, why,
                                                              monkeypatch):
  monkeypatch.setattr(attention, "probe_cudnn", lambda k, d: None)
  with pytest.raises(JaxlmError) as e:
    resolve(impl, platform, **kwargs)
  assert why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("impl, why", [
    ("cudnn", "model.attention_impl=cudnn: cuDNN attention needs an NVIDIA GPU"),
    ("splash", "model.attention_impl=splash: splash attention needs a TPU"),
])
def test_the_cli_refuses_an_impossible_kernel_before_compiling(tmp_path, impl, why):
  proc = run_jaxlm("train", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                   f"--config.model.attention_impl={impl}")
  assert_one_line_error(proc, why)
  assert not (tmp_path / "w" / "config.json").exists()


def test_dtype_auto_resolves_per_platform():
  assert attention.resolve_dtype("auto", CPU) == "float32"
  assert attention.resolve_dtype("auto", HOPPER) == "bfloat16"
  assert attention.resolve_dtype("auto", TPU) == "bfloat16"
  assert attention.resolve_dtype("float16", TPU) == "float16"  # Explicit values are kept.


def test_the_device_table_has_the_common_accelerators_and_a_float32_peak():
  for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "TPU v4",
               "TPU v5 lite", "TPU v5p", "TPU v6 lite"):
    assert devices.for_device_kind(kind) is not None, kind
  h100 = devices.for_device_kind("NVIDIA H100 80GB HBM3")
  assert h100.peak("bfloat16") == 989e12 and h100.peak("float32") == 494e12  # TF32, dense.
  v4 = devices.for_device_kind("TPU v4")
  assert v4.peak("float32") == v4.peak("bfloat16")


def test_cpu_tweaks_are_skipped_on_an_accelerator(monkeypatch):
  from jaxlm import host
  calls = []
  monkeypatch.setattr(host, "accelerator_expected", lambda: "gpu")
  from jaxlm.host import allocator, distributed, xla
  monkeypatch.setattr(allocator, "ensure", lambda v: calls.append(("allocator", v)))
  monkeypatch.setattr(xla, "apply", lambda v: calls.append(("xla", v)))
  monkeypatch.setattr(distributed, "initialize", lambda d: None)
  lines = []
  monkeypatch.setattr(logging, "info", lambda fmt, *a: lines.append(fmt % a))
  cfg = load_config("smoke")
  host.prepare_process(cfg, compile_cache=False)
  assert calls == [] and len(lines) == 1 and "CPU-only" in lines[0]
  with cfg.unlocked():
    cfg.xla_flags = "--xla_cpu_use_thunk_runtime=false"  # Explicit values still apply.
  host.prepare_process(cfg, compile_cache=False)
  assert calls == [("xla", "--xla_cpu_use_thunk_runtime=false")]
