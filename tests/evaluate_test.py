"""Evaluation: stacked-batch sums against a plain numpy loop, derived metrics, masks, jit."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import evaluate
from jaxlm import model as model_lib

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_model=32)


@functools.cache
def tiny_model():
  """(model, params) with N(0, 0.3) noise on every weight (as conftest.random_model, drawn in
  numpy to skip compiling one jax op per shape): the logits vary, so errors show."""
  model = model_lib.make_model(model_lib.ModelConfig(**TINY))
  params = nn.unbox(model_lib.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  noisy = lambda x: x + jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
  return model, jax.tree.map(noisy, params)


def host_batches(n=3, batch=2, length=16, vocab=64, seed=0, masked=False):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, vocab, size=(batch, length + 1)).astype(np.int32)
    b = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if masked:
      b["loss_mask"] = (rng.random((batch, length)) < rng.uniform(0.2, 0.9)).astype(np.float32)
    out.append(b)
  return out


def reference_sums(model, params, batches):
  """(summed nats, token count) by a plain loop: the model's apply, then float64 numpy."""
  nats, tokens = 0.0, 0.0
  for b in batches:
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(b["inputs"]), train=False),
                        np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, b["targets"][..., None], axis=-1)[..., 0]
    mask = b.get("loss_mask", np.ones_like(nll))
    nats += float((nll * mask).sum())
    tokens += float(mask.sum())
  return nats, tokens


def eval_fn(model, use_jit=True):
  fn = functools.partial(evaluate.eval_steps, model=model)
  return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize("masked", [False, True])
def test_evaluate_equals_a_plain_loop_with_numpy_log_softmax(masked):
  model, params = tiny_model()
  batches = host_batches(masked=masked)
  nats, tokens = reference_sums(model, params, batches)
  result = evaluate.evaluate(eval_fn(model), params, evaluate.stack(batches))
  assert set(result) == {"loss", "perplexity", "bits_per_token"}
  np.testing.assert_allclose(result["loss"], nats / tokens, rtol=2e-6)
  assert result["loss"] > 0.5  # Random weights: far from a trivial loss.


def test_masked_mean_is_token_weighted_not_a_mean_of_batch_means():
  model, params = tiny_model()
  batches = host_batches(n=3, seed=4, masked=True)
  batches[0]["loss_mask"][:] = 0.0
  batches[0]["loss_mask"][0, 0] = 1.0  # One token in batch 0: its mean alone is noisy.
  result = evaluate.evaluate(eval_fn(model), params, evaluate.stack(batches))
  nats, tokens = reference_sums(model, params, batches)
  np.testing.assert_allclose(result["loss"], nats / tokens, rtol=2e-6)
  per_batch = [np.divide(*reference_sums(model, params, [b])) for b in batches]
  assert abs(np.mean(per_batch) - result["loss"]) > 1e-3  # The weighting matters here.


def test_eval_steps_sums_loss_and_counts_unmasked_tokens():
  model, params = tiny_model()
  batches = host_batches(n=4, seed=1, masked=True)
  out = eval_fn(model)(params, evaluate.stack(batches))
  assert set(out) == {"loss_sum", "tokens"}
  nats, tokens = reference_sums(model, params, batches)
  assert float(out["tokens"]) == tokens == sum(b["loss_mask"].sum() for b in batches)
  np.testing.assert_allclose(float(out["loss_sum"]), nats, rtol=2e-6)
  # Without masks every target counts: N * B * L tokens.
  out = eval_fn(model)(params, evaluate.stack(host_batches(n=4, seed=1)))
  assert float(out["tokens"]) == 4 * 2 * 16


def test_eval_steps_equals_the_sum_of_single_eval_steps():
  model, params = tiny_model()
  batches = host_batches(n=3, seed=2, masked=True)
  step = jax.jit(functools.partial(evaluate.eval_step, model=model))
  singles = [step(params, jax.tree.map(jnp.asarray, b)) for b in batches]
  out = eval_fn(model)(params, evaluate.stack(batches))
  for key in ("loss_sum", "tokens"):
    np.testing.assert_allclose(float(out[key]), sum(float(s[key]) for s in singles), rtol=1e-6)


def test_jitted_and_eager_evaluation_agree():
  model, params = tiny_model()
  stacked = evaluate.stack(host_batches(seed=3, masked=True))
  jitted = evaluate.evaluate(eval_fn(model, use_jit=True), params, stacked)
  eager = evaluate.evaluate(eval_fn(model, use_jit=False), params, stacked)
  for key in jitted:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6)


def test_perplexity_and_bits_per_token_follow_from_the_loss():
  model, params = tiny_model()
  result = evaluate.evaluate(eval_fn(model), params, evaluate.stack(host_batches(seed=5)))
  assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-12)
  assert math.isclose(result["bits_per_token"], result["loss"] / math.log(2), rel_tol=1e-12)


def test_derived_metrics_from_fixed_sums():
  """evaluate() divides by the token count, exponentiates (capped) and converts to bits."""
  fixed = lambda loss_sum, tokens: (lambda params, batches: {
      "loss_sum": jnp.float32(loss_sum), "tokens": jnp.float32(tokens)})
  r = evaluate.evaluate(fixed(30.0, 12.0), None, None)
  assert math.isclose(r["loss"], 2.5, rel_tol=1e-7)
  assert math.isclose(r["perplexity"], math.exp(2.5), rel_tol=1e-6)
  assert math.isclose(r["bits_per_token"], 2.5 / math.log(2), rel_tol=1e-6)
  assert evaluate.evaluate(fixed(0.0, 0.0), None, None)["loss"] == 0.0  # No tokens: not NaN.
  huge = evaluate.evaluate(fixed(1e6, 1.0), None, None)
  assert huge["perplexity"] == math.exp(700.0) and math.isfinite(huge["perplexity"])


def test_uniform_logits_give_log_vocab():
  """A zero model (all weights 0) predicts uniformly: loss ln V, perplexity V, log2 V bits."""
  model, params = tiny_model()
  zero = jax.tree.map(jnp.zeros_like, params)
  r = evaluate.evaluate(eval_fn(model), zero, evaluate.stack(host_batches(seed=6)))
  assert math.isclose(r["loss"], math.log(64), rel_tol=1e-6)
  assert math.isclose(r["perplexity"], 64, rel_tol=1e-5)
  assert math.isclose(r["bits_per_token"], 6.0, rel_tol=1e-6)


def test_stack_puts_the_batch_index_first():
  batches = host_batches(n=5, batch=2, length=16, masked=True)
  stacked = evaluate.stack(batches)
  assert set(stacked) == {"inputs", "targets", "loss_mask"}
  assert stacked["inputs"].shape == stacked["targets"].shape == (5, 2, 16)
  np.testing.assert_array_equal(stacked["targets"][3], batches[3]["targets"])
  assert evaluate.stack(iter(batches))["inputs"].shape == (5, 2, 16)  # Any iterable.


def test_evaluation_runs_without_dropout():
  """A model with dropout evaluates deterministically, exactly like the same model without."""
  model, params = tiny_model()
  dropout_model = model_lib.make_model(model_lib.ModelConfig(**TINY, dropout=0.5))
  stacked = evaluate.stack(host_batches(seed=7))
  with_dropout = evaluate.evaluate(eval_fn(dropout_model), params, stacked)
  assert with_dropout == evaluate.evaluate(eval_fn(dropout_model), params, stacked)
  np.testing.assert_allclose(with_dropout["loss"],
                             evaluate.evaluate(eval_fn(model), params, stacked)["loss"],
                             rtol=1e-6)
