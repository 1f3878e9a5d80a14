"""Issue 19's model options against independent references: sliding windows, qk-norm, logit
soft-capping, the squared-ReLU MLP and zero-initialised output projections.

The references are written here in float64 numpy from the formulas (a whole GPT-2 forward
pass with an explicit band mask), not derived from jaxlm's own code.
"""

import dataclasses
import functools
import json
import math
import os

import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_one_line_error, load_config, run_jaxlm

from jaxlm import config as config_lib
from jaxlm import hf, hf_map, metrics, params, train
from jaxlm import model as model_lib
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError

V, T = 64, 16
TINY = dict(vocab_size=V, block_size=T, n_layer=2, n_head=4, d_model=32)
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False)
TOKENS_BxL = np.random.default_rng(0).integers(0, V, size=(2, T)).astype(np.int32)


# Options that leave the parameter tree alone: models that differ only in them share weights.
SAME_PARAMS = dict(attention_window="", logit_softcap=0.0, attention_block=0, remat="none")


@functools.cache
def _random_params(cfg):
  return conftest.random_model(dataclasses.asdict(cfg))[1]


def random_model(base, **overrides):
  """conftest.random_model (weights far from the init, so every one matters), the weights
  drawn once per parameter tree: init is the slow part of these tests."""
  cfg = model_lib.ModelConfig(**{**base, **overrides})
  return model_lib.make_model(cfg), _random_params(dataclasses.replace(cfg, **SAME_PARAMS))


def logits(model, params_, tokens_BxL=TOKENS_BxL):
  # Op by op: XLA compiles each op once per shape for the whole session, a jit once per model.
  return np.asarray(model.apply({"params": params_}, jnp.asarray(tokens_BxL)))


def stacked(params_, n_layer):
  """Unrolled params (h_0, h_1, ...) in the scan_layers layout (one `h` with a layers axis)."""
  blocks = [params_[model_lib.block_name(i)] for i in range(n_layer)]
  rest = {k: v for k, v in params_.items() if model_lib.block_index(k) is None}
  return {**rest, model_lib.BLOCKS: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def scanned_twin(model, params_, **overrides):
  """The same model and weights with scan_layers on (and `overrides`)."""
  cfg = dataclasses.replace(model.cfg, scan_layers=True, **overrides)
  return model_lib.make_model(cfg), stacked(params_, cfg.n_layer)


# ---------------------------------------------------------------------------------------------
# A float64 numpy reference of the GPT-2 family with every option.
# ---------------------------------------------------------------------------------------------

def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p.get("bias", 0.0)


def np_rms_norm(x, scale, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def band_mask(L, window):
  """mask[t, s]: query t attends key s. Causal; with window W, only s in [t-W+1, t]."""
  t, s = np.arange(L)[:, None], np.arange(L)[None, :]
  return (s <= t) & ((window == 0) | (s > t - window))


def reference_logits(cfg, p, tokens_BxL):
  """GPT-2 (LayerNorm, learned positions, biases, tied head) with cfg's options, in float64."""
  assert (cfg.norm, cfg.position, cfg.tie_embeddings, cfg.bias) == ("layernorm", "learned",
                                                                     True, True)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  B, L = tokens_BxL.shape
  H, G, K = cfg.n_head, cfg.kv_heads, cfg.head_dim
  x = p["wte"]["embedding"][tokens_BxL] + p["wpe"]["embedding"][:L][None]
  for i, window in enumerate(cfg.layer_windows):
    b = p[f"h_{i}"]
    a = b["attn"]
    h = np_layer_norm(x, b["ln_1"], cfg.norm_eps)
    q = np.einsum("bld,dhk->blhk", h, a["query"]["kernel"]) + a["query"]["bias"]
    kv = np.einsum("bld,dxgk->blxgk", h, a["key_value"]["kernel"]) + a["key_value"]["bias"]
    k, v = kv[:, :, 0], kv[:, :, 1]
    if cfg.qk_norm:
      q = np_rms_norm(q, a["query_norm"]["scale"], cfg.norm_eps)
      k = np_rms_norm(k, a["key_norm"]["scale"], cfg.norm_eps)
    k, v = np.repeat(k, H // G, axis=2), np.repeat(v, H // G, axis=2)  # Query head -> kv head.
    scores = np.einsum("blhk,bshk->bhls", q, k) / math.sqrt(K)
    scores = np.where(band_mask(L, window)[None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhls,bshk->blhk", probs, v)
    x = x + np.einsum("blhk,hkd->bld", o, a["out"]["kernel"]) + a["out"]["bias"]
    m = b["mlp"]
    f = np_layer_norm(x, b["ln_2"], cfg.norm_eps) @ m["fc"]["kernel"] + m["fc"]["bias"]
    if cfg.mlp == "relu2":
      f = np.maximum(f, 0.0) ** 2
    else:
      f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
    x = x + f @ m["proj"]["kernel"] + m["proj"]["bias"]
  out = np_layer_norm(x, p["ln_f"], cfg.norm_eps) @ p["wte"]["embedding"].T
  if cfg.logit_softcap:
    out = cfg.logit_softcap * np.tanh(out / cfg.logit_softcap)
  return out


# ---------------------------------------------------------------------------------------------
# Sliding windows.
# ---------------------------------------------------------------------------------------------

def test_window_spec_is_cycled_over_the_layers():
  assert model_lib.parse_windows("", 3) == (0, 0, 0)
  assert model_lib.parse_windows("128,128,128,full", 6) == (128, 128, 128, 0, 128, 128)
  assert model_lib.parse_windows(" 4 , full", 3) == (4, 0, 4)
  cfg = model_lib.ModelConfig(**TINY, attention_window="3,full")
  assert cfg.layer_windows == (3, 0) and cfg.scan_window == -1
  assert model_lib.ModelConfig(**TINY, attention_window="5").scan_window == 5


@pytest.mark.parametrize("overrides", [
    dict(attention_window="1"),  # Each token attends only to itself.
    dict(attention_window="3,full"),
    dict(attention_window="3,full", attention_block=4),  # Blocked: skips keys outside.
    dict(attention_window="5,2", attention_block=5),  # Blocks that do not divide L.
    dict(attention_window="3,full", n_kv_head=2, attention_block=4),  # GQA.
    dict(attention_window="3,full", scan_layers=True, remat="full"),  # Windows scanned.
    dict(attention_window="3,6", scan_layers=True, attention_block=4),  # Widest: 6.
    dict(attention_window="4", scan_layers=True, attention_block=4),  # One static window.
    dict(attention_window="3,full", qk_norm=True, mlp="relu2", logit_softcap=2.0),
])
def test_forward_matches_the_numpy_band_mask_reference(overrides):
  scan = overrides.pop("scan_layers", False)
  model, p = random_model(TINY, **overrides)
  want = reference_logits(model.cfg, p, TOKENS_BxL)
  # The window matters: full attention gives other logits past the first positions.
  full = reference_logits(dataclasses.replace(model.cfg, attention_window=""), p, TOKENS_BxL)
  assert np.abs(full - want)[:, 7:].max() > 1e-2
  if scan:
    model, p = scanned_twin(model, p)
  np.testing.assert_allclose(logits(model, p), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("attention_block, scan", [(0, False), (4, False), (4, True)])
def test_window_of_at_least_block_size_is_full_attention(attention_block, scan):
  model, p = random_model(TINY, attention_block=attention_block)
  if scan:
    model, p = scanned_twin(model, p)
  full = logits(model, p)
  for window in (str(T), str(3 * T), f"{T},full"):
    windowed = model_lib.make_model(dataclasses.replace(model.cfg, attention_window=window))
    np.testing.assert_array_equal(logits(windowed, p), full)


def test_window_1_attention_output_is_the_tokens_own_value():
  """With W = 1 the softmax has one key, so attention returns each token's own value."""
  cfg = model_lib.ModelConfig(**TINY, attention_window="1")
  attn = model_lib.CausalSelfAttention(cfg, window=1)
  x_BxLxD = jax.random.normal(jax.random.key(0), (2, T, cfg.d_model))
  p = nn.unbox(attn.init(jax.random.key(1), x_BxLxD, train=False))["params"]
  out_BxLxD, _ = attn.apply({"params": p}, x_BxLxD, train=False)
  x_BxLxD, p = np.asarray(x_BxLxD, np.float64), jax.tree.map(np.asarray, p)
  v_BxLxGxK = (np.einsum("bld,dgk->blgk", x_BxLxD, p["key_value"]["kernel"][:, 1])
               + p["key_value"]["bias"][1])
  want = np.einsum("blhk,hkd->bld", v_BxLxGxK, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out_BxLxD, want, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(n_layer=1, attention_window="3"),
    dict(n_layer=1, attention_window="3", attention_block=4),
    # Two layers see 2 (W - 1) tokens back. Remat: the backward pass recomputes the windows.
    dict(n_layer=2, attention_window="3", remat="dots"),
    dict(n_layer=2, attention_window="3,5", scan_layers=True, attention_block=4, remat="full"),
])
def test_loss_at_t_has_zero_gradient_outside_the_window(overrides):
  """d logits[t] / d wpe[s] (the input at position s) is zero exactly where s is outside the
  receptive field [t - n_layer (W - 1), t] (for one layer: [t - W + 1, t])."""
  scan = overrides.pop("scan_layers", False)
  model, p = random_model(TINY, **overrides)
  if scan:
    model, p = scanned_twin(model, p)
  reach = sum(w - 1 for w in model.cfg.layer_windows)
  grad_at = jax.jit(jax.grad(
      lambda q, t: model.apply({"params": q}, jnp.asarray(TOKENS_BxL))[:, t].sum()))
  for t in (2, 9, T - 1):
    g_wpe = grad_at(p, t)["wpe"]["embedding"]
    seen = np.abs(np.asarray(g_wpe)).sum(-1) > 0
    want = (np.arange(T) <= t) & (np.arange(T) >= t - reach)
    np.testing.assert_array_equal(seen, want)


# ---------------------------------------------------------------------------------------------
# Decoding with the KV cache.
# ---------------------------------------------------------------------------------------------

EVERY_OPTION = dict(qk_norm=True, logit_softcap=3.0, attention_window="3,full", mlp="relu2",
                    zero_init_proj=True)


@pytest.mark.parametrize("overrides", [
    EVERY_OPTION,
    {**EVERY_OPTION, **LLAMA, "mlp": "relu2", "n_kv_head": 2},
    # Scanned, the two layers' windows differ: each reads its own from the scanned array.
    {**EVERY_OPTION, **LLAMA, "mlp": "relu2", "scan_layers": True, "attention_window": "2,5"},
])
def test_cached_decoding_equals_the_full_forward_pass(overrides):
  """One token per call from position 0 (one compiled step; tests/sample_test.py and the
  greedy test below feed prompts of several tokens)."""
  model, p = random_model(TINY, **overrides)
  B = TOKENS_BxL.shape[0]
  full_BxLxV = logits(model, p)
  apply = jax.jit(lambda q, t, pos, c: model.apply({"params": q}, t, positions_BxL=pos, cache=c))
  cache, got = model_lib.init_cache(model.cfg, B), []
  for t in range(T):
    logits_Bx1xV, cache = apply(p, TOKENS_BxL[:, t:t + 1], np.full((B, 1), t), cache)
    got.append(logits_Bx1xV)
  np.testing.assert_allclose(np.concatenate(got, axis=1), full_BxLxV, atol=1e-5, rtol=1e-5)


def test_greedy_sampling_with_every_option_is_the_argmax_of_the_full_forward():
  from jaxlm import sample
  model, p = random_model(TINY, **EVERY_OPTION)
  prompt = TOKENS_BxL[:1, :4]
  generate = jax.jit(lambda q, x, rng: sample.generate(q, x, rng, model=model,
                                                      max_new_tokens=8, temperature=0.0))
  tokens_BxM, _ = generate(p, jnp.asarray(prompt), jax.random.key(0))
  # The reference re-runs the full forward pass on the sequence so far, padded to T: the
  # logits at its last real position do not depend on the padding (causality).
  seq = list(prompt[0])
  for _ in range(8):
    padded_1xT = np.array([seq + [0] * (T - len(seq))], np.int32)
    seq.append(int(np.argmax(logits(model, p, padded_1xT)[0, len(seq) - 1])))
  assert list(np.asarray(tokens_BxM[0])) == seq[4:]


# ---------------------------------------------------------------------------------------------
# Logit soft-capping, relu2, qk-norm, zero-initialised projections.
# ---------------------------------------------------------------------------------------------

def test_softcap_is_cap_tanh_of_the_uncapped_logits():
  cap = 2.0
  model, p = random_model(TINY)
  capped = model_lib.make_model(model_lib.ModelConfig(**TINY, logit_softcap=cap))
  raw, got = logits(model, p), logits(capped, p)
  assert got.dtype == np.float32
  assert np.abs(raw).max() > 2 * cap  # The cap bites.
  assert np.abs(got).max() < cap
  np.testing.assert_allclose(got, cap * np.tanh(raw / cap), atol=1e-6, rtol=1e-6)


def test_relu2_mlp_is_the_squared_relu_formula():
  cfg = model_lib.ModelConfig(**TINY, mlp="relu2")
  mlp = model_lib.MLP(cfg)
  x_BxLxD = jax.random.normal(jax.random.key(0), (2, T, cfg.d_model))
  p = nn.unbox(mlp.init(jax.random.key(1), x_BxLxD, train=False))["params"]
  assert set(p) == {"fc", "proj"}  # The same two matrices as gelu.
  p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), p)
  x = np.asarray(x_BxLxD, np.float64)
  h = np.maximum(x @ np.asarray(p["fc"]["kernel"]) + np.asarray(p["fc"]["bias"]), 0.0) ** 2
  want = h @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
  got = mlp.apply({"params": p}, x_BxLxD, train=False)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_qk_norm_scales_per_layer_with_logical_axes_and_counts():
  base = model_lib.ModelConfig(**TINY)
  cfg = model_lib.ModelConfig(**TINY, qk_norm=True)
  boxed = model_lib.init_params(model_lib.make_model(cfg), jax.random.key(0))
  rows = {t.path: t for t in params.tensors(boxed)}
  for i in range(cfg.n_layer):
    for name in (model_lib.QUERY_NORM, model_lib.KEY_NORM):
      t = rows[f"h_{i}/attn/{name}/scale"]
      assert t.shape == (cfg.head_dim,) and t.logical_axes == ("head_dim",)
      assert t.kind == "norm scale"
  scanned = model_lib.init_params(
      model_lib.make_model(model_lib.ModelConfig(**TINY, qk_norm=True, scan_layers=True)),
      jax.random.key(0))
  t = {t.path: t for t in params.tensors(scanned)}["h/attn/query_norm/scale"]
  assert t.shape == (cfg.n_layer, cfg.head_dim) and t.logical_axes == ("layers", "head_dim")
  n = model_lib.count_params(nn.unbox(boxed))
  n_base = model_lib.count_params(nn.unbox(model_lib.init_params(model_lib.make_model(base),
                                                                 jax.random.key(0))))
  assert n - n_base == cfg.n_layer * 2 * cfg.head_dim
  assert params.formula_param_counts(cfg)["total"] == n
  assert params.formula_block_params(cfg) - params.formula_block_params(base) == 2 * cfg.head_dim


def test_jaxlm_params_report_counts_the_qk_norm_scales_and_windowed_flops():
  cfg = load_config("smoke")
  cfg.model.qk_norm = True
  cfg.model.attention_window = "4,full"
  r = params.config_report(cfg, n_devices=8)
  mcfg = config_lib.model_config(cfg, 65)
  tree = model_lib.init_params(model_lib.make_model(mcfg), jax.random.key(0))
  assert r["params"]["total"] == model_lib.count_params(nn.unbox(tree)) == (
      r["params"]["formula_total"])
  assert r["params"]["by_kind"]["norm scale"] == 2 * (2 * 32 + 2 * 8) + 32
  # 6·N + 12·d_model·(4 + 16): layer 0 attends to 4 keys, layer 1 to all 16.
  assert r["compute"]["attended_keys"] == 20
  assert r["compute"]["flops_per_token"] == 6 * r["params"]["matmul"] + 12 * 32 * 20
  assert "12·32·20" in params.format_config_text(r)
  assert metrics.attended_keys(2, 16) == 32  # No windows: the nanoGPT rule as before.


def test_zero_init_proj_zeroes_only_the_output_projections_until_a_step_moves_them():
  def init(model):
    return jax.jit(lambda r: nn.unbox(model_lib.init_params(model, r)))(jax.random.key(0))
  base = init(model_lib.make_model(model_lib.ModelConfig(**TINY)))
  model = model_lib.make_model(model_lib.ModelConfig(**TINY, zero_init_proj=True))
  p = init(model)
  zeroed = {f"h_{i}/{sub}/{proj}/kernel" for i in range(2)
            for sub, proj in (("attn", "out"), ("mlp", "proj"))}
  flat = {model_lib.path_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}
  flat_base = {model_lib.path_name(k): v
               for k, v in jax.tree_util.tree_flatten_with_path(base)[0]}
  for path, x in flat.items():
    if path in zeroed:
      assert np.all(np.asarray(x) == 0) and np.any(np.asarray(flat_base[path]) != 0), path
    else:  # Everything else is the default init, bit for bit.
      np.testing.assert_array_equal(x, flat_base[path], err_msg=path)

  tx = optax.sgd(0.1)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  tokens = np.random.default_rng(1).integers(0, V, size=(4, T + 1)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  step = jax.jit(lambda st, b: step_lib.train_step(st, b, jax.random.key(0), model=model, tx=tx))
  state, _ = step(state, batch)
  flat = {model_lib.path_name(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  for path in zeroed:
    assert np.any(np.asarray(flat[path]) != 0), path


# ---------------------------------------------------------------------------------------------
# Export, bad input and training.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    (dict(qk_norm=True), "model.qk_norm=True (their attention has no query/key norm)"),
    (dict(logit_softcap=30.0), "model.logit_softcap=30"),
    (dict(mlp="relu2"), "model.mlp=relu2"),
    (dict(attention_window="4,full"), "model.attention_window='4,full'"),
])
def test_export_refuses_what_transformers_cannot_express(overrides, fragment):
  with pytest.raises(JaxlmError, match="cannot export to Hugging Face") as e:
    hf_map.family_of(model_lib.ModelConfig(**TINY, **overrides))
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_export_accepts_what_is_plain_gpt2_after_training():
  # zero_init_proj only changes the init; a window of the whole block is full attention.
  cfg = model_lib.ModelConfig(**TINY, zero_init_proj=True, attention_window=str(T))
  assert hf_map.family_of(cfg) == "gpt2"


@pytest.mark.parametrize("key, value, fragment", [
    ("attention_window", "0", "got '0'"),
    ("attention_window", "-5", "got '-5'"),
    ("attention_window", "abc", "got 'abc'"),
    ("attention_window", "4,,full", "got ''"),
    ("logit_softcap", -1.0, "model.logit_softcap must be >= 0"),
    ("mlp", "relu3", "model.mlp='relu3' is not one of gelu, swiglu, relu2"),
])
def test_bad_options_fail_config_validation_in_one_line(key, value, fragment):
  cfg = load_config("smoke")
  cfg.model[key] = value
  with pytest.raises(JaxlmError, match="invalid model config") as e:
    config_lib.validate_config(cfg)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_cli_rejects_a_bad_window_before_compiling(tmp_path):
  proc = run_jaxlm("train", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                   "--config.model.attention_window=128,0")
  assert_one_line_error(proc, "model.attention_window='128,0'", "integer window >= 1")
  assert "compiled" not in proc.stderr and not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [
    ("qk_norm", True), ("logit_softcap", 5.0), ("mlp", "relu2"), ("zero_init_proj", True),
    ("attention_window", "4,full"),
])
def test_each_option_trains_the_smoke_config(tmp_path, key, value):
  cfg = load_config("smoke")
  cfg.model[key] = value
  cfg.train.steps = 40
  cfg.train.eval_every = 0
  cfg.checkpoint.every = 0
  cfg.sample.max_new_tokens = 1
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(cfg, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0] - 0.3, losses
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"][key] == value
  if key == "zero_init_proj":
    hf.export_hf(workdir, str(tmp_path / "hf"))  # Plain GPT-2 weights: exports.
  else:
    with pytest.raises(JaxlmError, match=f"cannot export to Hugging Face.*model.{key}"):
      hf.export_hf(workdir, str(tmp_path / "hf"))
