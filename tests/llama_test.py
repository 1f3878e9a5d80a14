"""LLaMA family: RoPE is relative, cached decoding matches, presets, parameter counts, it learns."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, random_model

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import model as model_lib
from jaxlm import params as params_lib
from jaxlm import train

LLAMA = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
             d_ff=96, norm="rmsnorm", position="rope", mlp="swiglu", bias=False,
             tie_embeddings=False)


def make(**overrides):
  return random_model(LLAMA, **overrides)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q_1xLxHxK = jnp.asarray(rng.normal(size=(1, 8, 2, 16)), jnp.float32)
  k_1xLxHxK = jnp.asarray(rng.normal(size=(1, 8, 2, 16)), jnp.float32)
  def scores(offset):
    positions_1xL = jnp.arange(8)[None] + offset
    q = model_lib.rope(q_1xLxHxK, positions_1xL, 10000.0)
    k = model_lib.rope(k_1xLxHxK, positions_1xL, 10000.0)
    return np.asarray(jnp.einsum("blhk,bshk->bhls", q, k))
  base = scores(0)
  np.testing.assert_allclose(scores(5), base, atol=1e-4)
  np.testing.assert_allclose(scores(1000), base, atol=1e-3)
  # And the positions matter at all: without rotation the scores differ.
  plain = np.asarray(jnp.einsum("blhk,bshk->bhls", q_1xLxHxK, k_1xLxHxK))
  assert np.abs(plain - base).max() > 0.1


def test_rope_model_logits_are_invariant_to_shifting_every_position():
  model, params = make()
  tokens_BxL = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(2, 10)), jnp.int32)
  base = model.apply({"params": params}, tokens_BxL)
  shifted = model.apply({"params": params}, tokens_BxL,
                        positions_BxL=jnp.broadcast_to(jnp.arange(10) + 3, (2, 10)))
  np.testing.assert_allclose(shifted, base, atol=1e-4)


def test_rope_keeps_the_norm_of_every_vector():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 3, 8)), jnp.float32)
  y = model_lib.rope(x, jnp.broadcast_to(jnp.arange(5) * 7, (2, 5)), 10000.0)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(), dict(n_kv_head=1), dict(n_kv_head=0),
    dict(scan_layers=True, remat="dots"),
])
def test_cached_decoding_equals_the_full_forward_pass(overrides):
  model, params = make(**overrides)
  B, L, P = 2, 16, 5
  tokens_BxL = np.random.default_rng(3).integers(0, 64, size=(B, L)).astype(np.int32)
  full_BxLxV = np.asarray(model.apply({"params": params}, jnp.asarray(tokens_BxL)))
  apply = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, positions_BxL=pos,
                                                   cache=c))
  logits_BxPxV, cache = apply(params, tokens_BxL[:, :P], np.broadcast_to(np.arange(P), (B, P)),
                              model_lib.init_cache(model.cfg, B))
  got = [np.asarray(logits_BxPxV)]
  for t in range(P, L):
    logits_Bx1xV, cache = apply(params, tokens_BxL[:, t:t + 1], np.full((B, 1), t), cache)
    got.append(np.asarray(logits_Bx1xV))
  np.testing.assert_allclose(np.concatenate(got, axis=1), full_BxLxV, atol=1e-4, rtol=0)


def test_llama_parameter_paths():
  _, params = make()
  assert "wpe" not in params and "lm_head" in params
  assert set(params["h_0"]["mlp"]) == {"gate", "fc", "proj"}
  assert set(params["h_0"]["ln_1"]) == {"scale"}
  assert params["h_0"]["attn"]["key_value"]["kernel"].shape == (32, 2, 2, 8)


def test_family_presets_and_overrides():
  cfg = load_config("smoke")
  cfg.model.family = "llama"
  m = config_lib.model_config(cfg, 65)
  assert (m.norm, m.position, m.mlp, m.bias, m.tie_embeddings) == (
      "rmsnorm", "rope", "swiglu", False, False)
  assert m.ff_dim == config_lib.llama_ff_dim(cfg.model.d_model)
  assert config_lib.llama_ff_dim(4096) == 11008  # LLaMA 1/2 7B.
  cfg.model.norm, cfg.model.bias, cfg.model.position = "layernorm", True, "learned"
  m = config_lib.model_config(cfg, 65)
  assert (m.norm, m.position, m.mlp, m.bias) == ("layernorm", "learned", "swiglu", True)
  gpt = config_lib.model_config(load_config("smoke"), 65)
  assert (gpt.norm, gpt.position, gpt.mlp, gpt.bias, gpt.tie_embeddings) == (
      "layernorm", "learned", "gelu", True, True)


def report_for(name, **overrides):
  cfg = load_config(name)
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    cfg[section][key] = value
  return params_lib.config_report(cfg, n_devices=8)


@pytest.mark.parametrize("name, total, per_block", [
    ("llama2_7b", 6_738_415_616, 202_383_360),
    ("llama3_8b", 8_030_261_248, 218_112_000),
])
def test_llama_shapes_match_meta_parameter_counts(name, total, per_block):
  p = report_for(name)["params"]
  assert p["total"] == total == p["formula_total"]
  assert p["by_kind"]["bias"] == 0 == p["formula_by_kind"]["bias"]
  assert p["formula_per_block"] == per_block


@pytest.mark.parametrize("overrides", [
    {"model__family": "llama"},
    {"model__family": "llama", "model__bias": True},
    {"model__family": "llama", "model__position": "learned", "model__tie_embeddings": True},
    {"model__norm": "rmsnorm"},
    {"model__mlp": "swiglu", "model__bias": False},
])
def test_formula_matches_the_flax_tree_for_mixed_architectures(overrides):
  r = report_for("smoke", **overrides)
  assert r["params"]["by_kind"] == r["params"]["formula_by_kind"]
  assert not r["warnings"]


@pytest.mark.slow
def test_llama_tiny_learns_and_has_no_biases(tmp_path):
  cfg = load_config("llama_tiny")
  cfg.train.steps = 300
  cfg.train.batch_size = 16  # Divisible by the 8 fake devices of the tests.
  cfg.train.eval_every = 300
  cfg.train.eval_steps = 5
  cfg.checkpoint.every = 0
  cfg.sample.max_new_tokens = 8
  result = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  raw, _ = data_lib.read_corpus("")
  counts = collections.Counter(raw.decode("utf-8"))
  n = sum(counts.values())
  unigram_entropy = -sum(c / n * math.log(c / n) for c in counts.values())  # ~3.31 nats.
  assert result["val/loss"] < unigram_entropy - 0.5
  report = params_lib.config_report(cfg, n_devices=1)
  assert report["params"]["by_kind"]["bias"] == 0
  assert "wpe" not in report["params"]["by_layer"]
