"""Model: shapes and dtypes, causality, init loss, logical axes on every parameter, overfitting."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_model=32)


def make(**overrides):
  cfg = model_lib.ModelConfig(**{**TINY, **overrides})
  model = model_lib.make_model(cfg)
  params = nn.unbox(model_lib.init_params(model, jax.random.key(0)))
  return model, params


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shape_and_dtype(use_jit, dtype):
  model, params = make(dtype=dtype)
  apply = lambda p, t: model.apply({"params": p}, t)
  if use_jit:
    apply = jax.jit(apply)
  tokens_BxL = jnp.zeros((3, 16), jnp.int32)
  logits_BxLxV = apply(params, tokens_BxL)
  assert logits_BxLxV.shape == (3, 16, 64)
  assert logits_BxLxV.dtype == jnp.float32  # Logits are f32 whatever the compute dtype.
  # Shorter sequences than the block work too.
  assert apply(params, tokens_BxL[:, :5]).shape == (3, 5, 64)


def test_params_are_plain_float32_arrays_with_expected_count():
  _, params = make()
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
  D, V, L, N, F = 32, 64, 16, 2, 128
  # Per block: ln_1, ln_2 (scale+bias), q/k/v (+bias), out (+bias), fc (+bias), proj (+bias).
  per_block = 2 * 2 * D + 3 * (D * D + D) + (D * D + D) + (D * F + F) + (F * D + D)
  expected = V * D + L * D + N * per_block + 2 * D  # wte, wpe, blocks, ln_f (tied head).
  assert sum(x.size for x in leaves) == expected


def test_every_parameter_has_logical_axes():
  cfg = model_lib.ModelConfig(**TINY, tie_embeddings=False)
  model = model_lib.make_model(cfg)
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape)


def param_paths(**overrides):
  model = model_lib.make_model(model_lib.ModelConfig(**{**TINY, **overrides}))
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  return {"/".join(p.key for p in path) for path, _ in
          jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}


def test_parameter_paths_are_the_ones_saved_checkpoints_hold():
  """Written out, not built from model.py's names: a rename must fail here, not orphan runs."""
  gpt2_block = ["ln_1/scale", "ln_1/bias", "attn/query/kernel", "attn/query/bias",
                "attn/key_value/kernel", "attn/key_value/bias", "attn/out/kernel", "attn/out/bias",
                "ln_2/scale", "ln_2/bias", "mlp/fc/kernel", "mlp/fc/bias", "mlp/proj/kernel",
                "mlp/proj/bias"]
  top = {"wte/embedding", "wpe/embedding", "ln_f/scale", "ln_f/bias"}
  assert param_paths(tie_embeddings=False) == top | {"lm_head/kernel"} | {
      f"h_{i}/{p}" for i in range(2) for p in gpt2_block}
  assert param_paths(scan_layers=True) == top | {f"h/{p}" for p in gpt2_block}
  llama_block = ["ln_1/scale", "attn/query/kernel", "attn/key_value/kernel", "attn/out/kernel",
                 "ln_2/scale", "mlp/fc/kernel", "mlp/gate/kernel", "mlp/proj/kernel"]
  assert param_paths(norm="rmsnorm", position="rope", mlp="swiglu", bias=False) == {
      "wte/embedding", "ln_f/scale"} | {f"h_{i}/{p}" for i in range(2) for p in llama_block}


def test_block_names_round_trip():
  assert [model_lib.block_name(i) for i in (0, 11)] == ["h_0", "h_11"]
  assert [model_lib.block_index(n) for n in ("h_0", "h_11")] == [0, 11]
  for other in ("h", "h_", "h_x", "h_1a", "hh_1", "wte", "ln_f"):
    assert model_lib.block_index(other) is None, other


def test_path_name_is_the_same_for_boxed_and_plain_trees():
  model = model_lib.make_model(model_lib.ModelConfig(**TINY))
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  flat = lambda tree, **kw: [model_lib.path_name(path) for path, _ in
                             jax.tree_util.tree_flatten_with_path(tree, **kw)[0]]
  names = flat(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert names == flat(nn.unbox(boxed)) == flat(boxed)  # The last one ends in `.value` keys.
  assert set(names) == param_paths() and "h_1/attn/key_value/kernel" in names


def test_causality_changing_token_t_leaves_earlier_logits_unchanged():
  model, params = make()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, size=(2, 16)).astype(np.int32)
  base = model.apply({"params": params}, tokens)
  for t in (0, 5, 15):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % 64
    out = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert not np.allclose(out[:, t], base[:, t])  # ...and the change is seen at t.


def test_causality_via_gradients_of_position_embeddings():
  """The loss at position t gives exactly zero gradient to position embeddings after t."""
  model, params = make()
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(2, 16)), jnp.int32)
  t = 6

  def loss_at_t(p):
    logits = model.apply({"params": p}, tokens)
    return logits[:, t].sum()

  g_wpe = jax.grad(loss_at_t)(params)["wpe"]["embedding"]
  assert np.all(np.asarray(g_wpe[t + 1:]) == 0.0)
  assert np.all(np.abs(np.asarray(g_wpe[:t + 1])).sum(axis=-1) > 0)


def test_loss_at_init_is_close_to_log_vocab():
  model, params = make(vocab_size=65)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 65, size=(8, 17)), jnp.int32)
  logits = model.apply({"params": params}, tokens[:, :-1])
  loss, _ = losses.cross_entropy(logits, tokens[:, 1:])
  assert abs(float(loss) - math.log(65)) < 0.05


def test_grouped_query_attention_matches_repeated_kv_heads():
  """GQA with G kv heads equals full MHA whose k/v heads are the G heads repeated."""
  model_g, params_g = make(n_kv_head=2)
  model_h, params_h = make(n_kv_head=0)
  params_h = jax.tree.map(lambda x: x, params_h)
  for i in range(2):
    kv = params_g[f"h_{i}"]["attn"]["key_value"]
    params_h[f"h_{i}"] = dict(params_g[f"h_{i}"])
    params_h[f"h_{i}"]["attn"] = dict(params_g[f"h_{i}"]["attn"])
    params_h[f"h_{i}"]["attn"]["key_value"] = {
        "kernel": jnp.repeat(kv["kernel"], 2, axis=2), "bias": jnp.repeat(kv["bias"], 2, axis=1)}
  for k in ("wte", "wpe", "ln_f"):
    params_h[k] = params_g[k]
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, size=(2, 16)), jnp.int32)
  np.testing.assert_allclose(model_g.apply({"params": params_g}, tokens),
                             model_h.apply({"params": params_h}, tokens), atol=1e-5)


def test_dropout_is_active_only_in_training():
  model, params = make(dropout=0.5)
  tokens = jnp.zeros((2, 16), jnp.int32)
  a = model.apply({"params": params}, tokens, train=False)
  b = model.apply({"params": params}, tokens, train=False)
  np.testing.assert_array_equal(a, b)
  c = model.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, c)


@pytest.mark.parametrize("block, n_kv_head", [(4, 0), (5, 0), (4, 2)])
def test_attention_in_query_blocks_matches_the_whole_sequence(block, n_kv_head):
  """attention_block only skips masked scores: logits and gradients as without it."""
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, size=(2, 16)), jnp.int32)
  whole, params = make(n_kv_head=n_kv_head)
  blocked, _ = make(n_kv_head=n_kv_head, attention_block=block)

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, tokens) ** 2)

  np.testing.assert_allclose(blocked.apply({"params": params}, tokens),
                             whole.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.grad(functools.partial(loss, blocked))(params),
               jax.grad(functools.partial(loss, whole))(params))


def test_tiny_model_overfits_one_batch():
  model, params = make()
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, size=(4, 17)), jnp.int32)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, tokens[:, :-1])
      return losses.cross_entropy(logits, tokens[:, 1:])[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  first = None
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state)
    first = first if first is not None else float(loss)
  assert first > 4.0 and float(loss) < 0.3, (first, float(loss))


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=30), "not divisible by model.n_head"),
    (dict(block_size=0), "block_size must be >= 1"),
    (dict(n_kv_head=3), "not divisible by model.n_kv_head"),
    (dict(dtype="float64"), "model.dtype"),
    (dict(dropout=1.0), "dropout"),
    (dict(attention_block=-1), "attention_block must be >= 0"),
])
def test_bad_model_config_is_a_clear_error(overrides, message):
  with pytest.raises(JaxlmError, match=message):
    model_lib.ModelConfig(**{**TINY, **overrides})


def test_sequence_longer_than_block_is_an_error():
  model, params = make()
  with pytest.raises(JaxlmError, match="exceeds model.block_size"):
    model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
