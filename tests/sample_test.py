"""Sampling: cache vs full forward, greedy vs argmax, filter statistics, seeds, errors, CLI."""

import functools
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_line_error, load_config, random_model, run_jaxlm

from jaxlm import model as model_lib
from jaxlm import sample, tokenizers, train
from jaxlm.errors import JaxlmError

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_model=32)


def make(**overrides):
  return random_model(TINY, **overrides)


def full_forward(model, params, tokens_BxL):
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens_BxL, jnp.int32)))


# ---------------------------------------------------------------------------------------------
# The KV cache.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(n_kv_head=0), dict(n_kv_head=2), dict(n_kv_head=1),  # Multi-head, GQA, multi-query.
    dict(n_kv_head=2, scan_layers=True, remat="dots"),  # One scanned block, stacked cache.
])
def test_cached_logits_equal_full_forward_for_right_padded_rows(overrides):
  model, params = make(**overrides)
  B, L, V = 3, 16, 64
  tokens_BxL = np.random.default_rng(0).integers(0, V, size=(B, L)).astype(np.int32)
  full_BxLxV = full_forward(model, params, tokens_BxL)

  # Prompts of 3, 8 and 12 tokens, right-padded with a token the rows never contain there.
  lengths_B = np.array([3, 8, 12])
  P = int(lengths_B.max())
  prompt_BxP = np.where(np.arange(P)[None, :] < lengths_B[:, None], tokens_BxL[:, :P], V - 1)
  apply = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, positions_BxL=pos,
                                                   cache=c))
  logits_BxPxV, cache = apply(params, prompt_BxP, np.broadcast_to(np.arange(P), (B, P)),
                              model_lib.init_cache(model.cfg, B))
  got_BxLxV = np.full((B, L, V), np.nan, np.float32)
  for b in range(B):
    got_BxLxV[b, :lengths_B[b]] = logits_BxPxV[b, :lengths_B[b]]
  # Then one token per call, each row at its own position. A finished row feeds its last
  # token again: the same key and value into the same slot, so its cache does not change.
  for step in range(L - lengths_B.min()):
    positions_B = np.minimum(lengths_B + step, L - 1)
    tokens_B = tokens_BxL[np.arange(B), positions_B]
    logits_Bx1xV, cache = apply(params, tokens_B[:, None], positions_B[:, None], cache)
    for b in range(B):
      if lengths_B[b] + step < L:
        got_BxLxV[b, positions_B[b]] = logits_Bx1xV[b, 0]
  np.testing.assert_allclose(got_BxLxV, full_BxLxV, atol=1e-5, rtol=0)


def test_prompt_can_be_fed_in_pieces():
  model, params = make()
  tokens_BxL = np.random.default_rng(1).integers(0, 64, size=(2, 16)).astype(np.int32)
  positions_BxL = np.broadcast_to(np.arange(16), (2, 16))
  cache = model_lib.init_cache(model.cfg, 2)
  pieces = []
  for lo, hi in ((0, 5), (5, 6), (6, 16)):
    logits_BxLxV, cache = model.apply({"params": params}, tokens_BxL[:, lo:hi],
                                      positions_BxL=positions_BxL[:, lo:hi], cache=cache)
    pieces.append(np.asarray(logits_BxLxV))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1),
                             full_forward(model, params, tokens_BxL), atol=1e-5, rtol=0)


def test_parameter_names_are_unchanged():
  model, _ = make()
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  paths = {"/".join(k.key for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
  assert {"wte/embedding", "wpe/embedding", "h_0/attn/query/kernel",
          "h_1/attn/key_value/bias", "h_0/attn/out/kernel", "h_1/mlp/fc/kernel",
          "ln_f/scale"} <= paths
  assert len(paths) == 4 + 2 * 14  # wte, wpe, ln_f (2) + 14 tensors per block.


# ---------------------------------------------------------------------------------------------
# Greedy decoding against the full forward pass.
# ---------------------------------------------------------------------------------------------

def reference_greedy(model, params, prompt, n, keep):
  """Repeated argmax of the full forward pass over the window the sampler documents: the last
  block_size tokens, dropping to the last `keep` when a new token does not fit."""
  S = model.cfg.block_size

  # One compilation: the window is padded to the block (causality makes padding after the
  # last real token irrelevant), and the logits are read at that token.
  @jax.jit
  def next_logits(window_1xS, n_real):
    return model.apply({"params": params}, window_1xS)[0, n_real - 1]

  seq, start, out = list(prompt), max(0, len(prompt) - S), []
  for _ in range(n):
    window_1xS = np.zeros((1, S), np.int32)
    window_1xS[0, :len(seq) - start] = seq[start:]
    out.append(int(np.argmax(next_logits(window_1xS, len(seq) - start))))
    seq.append(out[-1])
    if len(seq) - 1 - start >= S:
      start = len(seq) - keep
  return out


def test_greedy_equals_repeated_argmax_of_the_full_forward_pass():
  model, params = make(n_kv_head=2)
  prompts = [[5, 9, 1], [7, 3, 3, 8, 2, 60]]
  prompt_BxP = np.zeros((2, 6), np.int32)
  for b, p in enumerate(prompts):
    prompt_BxP[b, :len(p)] = p
  gen = jax.jit(functools.partial(sample.generate, model=model, max_new_tokens=10,
                                  temperature=0.0))
  tokens_BxM, counts_B = gen(params, prompt_BxP, jax.random.key(0),
                             prompt_lengths_B=np.array([3, 6]))
  assert list(np.asarray(counts_B)) == [10, 10]
  for b, p in enumerate(prompts):
    assert len(p) + 10 <= 16  # The window never slides here.
    expected = reference_greedy(model, params, p, 10, keep=16)
    assert list(np.asarray(tokens_BxM[b])) == expected
    assert len(set(expected)) > 3  # Not a degenerate repeat of one token.


@pytest.mark.parametrize("slide_keep", [0, 16, 1])
def test_greedy_past_block_size_slides_the_window(slide_keep):
  model, params = make()
  keep = slide_keep or 16 - 16 // 4
  prompts = [[4, 8, 15, 16, 23], list(np.random.default_rng(2).integers(0, 64, size=20))]
  prompt_BxP = np.zeros((2, 20), np.int32)
  for b, p in enumerate(prompts):
    prompt_BxP[b, :len(p)] = p
  gen = jax.jit(functools.partial(sample.generate, model=model, max_new_tokens=30,
                                  temperature=0.0, slide_keep=slide_keep))
  tokens_BxM, counts_B = gen(params, prompt_BxP, jax.random.key(0),
                             prompt_lengths_B=np.array([5, 20]))
  assert list(np.asarray(counts_B)) == [30, 30]
  for b, p in enumerate(prompts):  # The second prompt is longer than the block.
    assert list(np.asarray(tokens_BxM[b])) == reference_greedy(model, params, p, 30, keep)


def greedy(model, **settings):
  return jax.jit(functools.partial(sample.generate, model=model, max_new_tokens=12,
                                   temperature=0.0, **settings))


def test_greedy_ignores_the_seed():
  model, params = make()
  prompt_BxP = np.array([[1, 2, 3]], np.int32)
  gen = greedy(model)
  np.testing.assert_array_equal(gen(params, prompt_BxP, jax.random.key(0))[0],
                                gen(params, prompt_BxP, jax.random.key(1))[0])


def test_rows_stop_at_the_end_token():
  model, params = make()
  prompt_BxP = np.array([[1, 2, 3], [9, 8, 7]], np.int32)
  free = np.asarray(greedy(model)(params, prompt_BxP, jax.random.key(0))[0])
  end = int(free[0, 4])
  tokens_BxM, counts_B = greedy(model, end_token=end)(params, prompt_BxP, jax.random.key(0))
  for b in range(2):
    hits = np.flatnonzero(free[b] == end)
    n = int(hits[0]) + 1 if len(hits) else 12  # The end token itself is kept.
    assert int(counts_B[b]) == n
    np.testing.assert_array_equal(tokens_BxM[b, :n], free[b, :n])
    assert np.all(np.asarray(tokens_BxM[b, n:]) == -1)


# ---------------------------------------------------------------------------------------------
# The filters and the distribution they sample from.
# ---------------------------------------------------------------------------------------------

def nucleus(probs, p):
  """Indices of the smallest set of most likely tokens whose probability reaches p (float64)."""
  order = np.argsort(-probs, kind="stable")
  n = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
  return set(order[:n].tolist())


def softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z[np.isfinite(z)].max())
  return e / e.sum()


def expected_distribution(logits_V, temperature, top_k, top_p):
  """What temperature -> top-k -> top-p should sample from, computed independently."""
  z = np.asarray(logits_V, np.float64) / temperature
  if top_k:
    z = np.where(np.isin(np.arange(len(z)), np.argsort(-z)[:top_k]), z, -np.inf)
  probs = softmax64(z)
  keep = np.isin(np.arange(len(z)), sorted(nucleus(probs, top_p)))
  probs = np.where(keep, probs, 0.0)
  return probs / probs.sum()


def draw(logits_V, n, seed, **filters):
  logits_NxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
  tokens_N = jax.jit(functools.partial(sample.sample_token, **filters))(
      logits_NxV, jax.random.key(seed))
  return np.bincount(np.asarray(tokens_N), minlength=len(logits_V))


def chi_square_p_value(counts_V, probs_V):
  """P(chi2_df >= statistic) under probs_V; 0 when a token outside its support was drawn."""
  support = probs_V > 0
  if counts_V[~support].any():
    return 0.0
  expected = counts_V.sum() * probs_V[support]
  stat = float(np.sum((counts_V[support] - expected) ** 2 / expected))
  df = int(support.sum()) - 1
  # The chi-square survival function is the regularized upper incomplete gamma Q(df/2, x/2).
  return float(jax.scipy.special.gammaincc(df / 2.0, stat / 2.0))


LOGITS_V = np.random.default_rng(3).normal(0.0, 1.0, size=32).astype(np.float32)


def test_top_k_never_picks_outside_the_k_most_likely():
  counts_V = draw(LOGITS_V, 20_000, seed=0, temperature=3.0, top_k=5, top_p=1.0)
  top5 = set(np.argsort(-LOGITS_V)[:5].tolist())
  assert set(np.flatnonzero(counts_V).tolist()) == top5  # All of them, and only them.


@pytest.mark.parametrize("top_p", [0.5, 0.75, 0.95])
def test_top_p_never_picks_outside_the_nucleus(top_p):
  kept = nucleus(softmax64(LOGITS_V), top_p)
  assert 1 < len(kept) < 32
  finite_V = np.isfinite(np.asarray(sample.top_p_logits(jnp.asarray(LOGITS_V)[None], top_p)[0]))
  assert set(np.flatnonzero(finite_V).tolist()) == kept
  counts_V = draw(LOGITS_V, 20_000, seed=1, temperature=1.0, top_k=0, top_p=top_p)
  assert set(np.flatnonzero(counts_V).tolist()) == kept


def test_top_p_keeps_at_least_the_most_likely_token():
  kept_V = np.isfinite(np.asarray(sample.top_p_logits(jnp.asarray(LOGITS_V)[None], 1e-6)[0]))
  assert np.flatnonzero(kept_V).tolist() == [int(np.argmax(LOGITS_V))]


# False-failure rate of the goodness-of-fit test: one in a million (and the draws are seeded).
P_VALUE_THRESHOLD = 1e-6


def test_sampled_frequencies_match_the_renormalised_distribution():
  settings = dict(temperature=0.8, top_k=12, top_p=0.9)
  counts_V = draw(LOGITS_V, 200_000, seed=2, **settings)
  right_V = expected_distribution(LOGITS_V, **settings)
  assert chi_square_p_value(counts_V, right_V) > P_VALUE_THRESHOLD

  # The same test rejects the distributions that common bugs would sample from.
  wrong = {
      "temperature ignored": expected_distribution(LOGITS_V, 1.0, 12, 0.9),
      "top-k ignored": expected_distribution(LOGITS_V, 0.8, 0, 0.9),
      "top-p ignored": expected_distribution(LOGITS_V, 0.8, 12, 1.0),
      # Off by one: drops the token that makes the mass reach p.
      "nucleus one token short": (lambda q: q / q.sum())(
          np.where(np.arange(32) == np.where(right_V > 0, right_V, np.inf).argmin(), 0, right_V)),
      # Not renormalised after filtering: the kept tokens keep their unfiltered probabilities
      # and the missing mass goes to the most likely token.
      "not renormalised": (lambda q: q + (1 - q.sum()) * (np.arange(32) == np.argmax(q)))(
          np.where(right_V > 0, softmax64(LOGITS_V / 0.8), 0.0)),
  }
  for name, probs_V in wrong.items():
    assert np.abs(probs_V - right_V).max() > 1e-3, name  # Really a different distribution.
    assert chi_square_p_value(counts_V, probs_V) < P_VALUE_THRESHOLD, name


# ---------------------------------------------------------------------------------------------
# Seeds, streaming, bad input.
# ---------------------------------------------------------------------------------------------

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def text_sampler(**settings):
  tok = tokenizers.CharTokenizer(CHARS)
  model, params = make(vocab_size=tok.vocab_size)
  settings = dict(dict(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.95), **settings)
  return sample.make_sampler(model, sample.SampleSettings(**settings)), params, tok


def test_same_seed_same_text_different_seed_different_text():
  sampler, params, tok = text_sampler()
  run = lambda seed: sample.sample_text(sampler, params, tok, ["ROMEO:", "JULIET:"],
                                        jax.random.key(seed)).texts
  a, b, c = run(0), run(0), run(1)
  assert a == b and a != c
  assert all(len(t) == 40 for t in a + c)
  assert a[0] != a[1]  # Rows draw independently.


def test_streaming_in_chunks_gives_the_same_text():
  sampler, params, tok = text_sampler(max_new_tokens=37)
  pieces = []
  streamed = sample.sample_text(sampler, params, tok, ["ROMEO:"], jax.random.key(5),
                                on_text=pieces.append, chunk_tokens=8)
  whole = sample.sample_text(sampler, params, tok, ["ROMEO:"], jax.random.key(5))
  assert len(pieces) == 5 and "".join(pieces) == streamed.texts[0] == whole.texts[0]
  assert streamed.num_tokens == 37 and streamed.tokens_per_sec > 0


def test_streaming_bytes_never_splits_a_character():
  tok = tokenizers.ByteTokenizer()
  model, params = make(vocab_size=256)
  sampler = sample.make_sampler(model, sample.SampleSettings(max_new_tokens=40, temperature=2.0))
  pieces = []
  result = sample.sample_text(sampler, params, tok, ["é€"], jax.random.key(0),
                              on_text=pieces.append, chunk_tokens=3)
  # Random bytes are mostly invalid UTF-8: the stream must still add up to the final text.
  assert len(pieces) > 1 and "".join(pieces) == result.texts[0]


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=65), "top_k=65 is larger than the vocabulary (64 tokens)"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(slide_keep=17), "slide_keep must be in [1, model.block_size=16]"),
    (dict(end_token=64), "end_token=64 is not in the vocabulary"),
])
def test_bad_settings_are_one_line_errors(settings, message):
  model, params = make()
  kwargs = dict(dict(max_new_tokens=4), **settings)
  with pytest.raises(JaxlmError) as e:
    sample.generate(params, np.ones((1, 2), np.int32), jax.random.key(0), model=model, **kwargs)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_prompts_are_one_line_errors():
  tok = tokenizers.CharTokenizer(CHARS)
  with pytest.raises(JaxlmError, match="prompt is empty"):
    sample.encode_prompts(tok, [""])
  with pytest.raises(JaxlmError) as e:
    sample.encode_prompts(tok, ["ROMEO: ☃ #"])
  assert "'#☃'" in str(e.value) and "\n" not in str(e.value)  # Names the unknown characters.


# ---------------------------------------------------------------------------------------------
# A trained run: the samples.txt hook, and `jaxlm sample` end to end.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A smoke run of 4 steps with evaluations and samples at steps 0, 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("sample") / "run")
  cfg = load_config("smoke")
  cfg.train.steps, cfg.train.eval_every, cfg.train.eval_steps = 4, 2, 1
  cfg.sample.every = 2
  cfg.sample.prompt, cfg.sample.max_new_tokens = "ROMEO:", 24
  train.train_and_evaluate(cfg, workdir)
  return workdir


@pytest.mark.parametrize("key, value, message", [
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("prompt", "ROMEO: ☃", "'☃'"),
])
def test_training_with_bad_sample_settings_fails_before_writing_anything(tmp_path, key, value,
                                                                         message):
  cfg = load_config("smoke")
  cfg.sample[key] = value
  workdir = tmp_path / "run"
  with pytest.raises(JaxlmError, match=re.escape(message)):
    train.train_and_evaluate(cfg, str(workdir))
  assert not (workdir / "config.json").exists()


@pytest.mark.slow
def test_training_appends_a_sample_every_sample_every_steps_and_at_the_end(trained):
  with open(os.path.join(trained, "samples.txt"), encoding="utf-8") as f:
    parts = re.split(r"== step (\d+) ==\n", f.read())
  assert parts[0] == "" and parts[1::2] == ["0", "2", "4"]
  for text in parts[2::2]:  # The prompt, 24 sampled characters and a newline.
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 24 + 1


def sample_cli(workdir, *args):
  return run_jaxlm("sample", "--workdir", workdir, *args)


@pytest.mark.slow
def test_cli_streams_a_sample_and_reports_tokens_per_second(trained):
  proc = sample_cli(trained, "--prompt", "JULIET:", "--max_new_tokens", "40", "--temperature",
                    "0.8", "--top_k", "40", "--top_p", "0.95", "--seed", "0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("JULIET:") and len(proc.stdout) == len("JULIET:") + 40 + 1
  assert "40 tokens" in proc.stderr and "tokens/s" in proc.stderr
  again = sample_cli(trained, "--prompt", "JULIET:", "--max_new_tokens", "40", "--temperature",
                     "0.8", "--top_k", "40", "--top_p", "0.95", "--seed", "0")
  other = sample_cli(trained, "--prompt", "JULIET:", "--max_new_tokens", "40", "--temperature",
                     "0.8", "--top_k", "40", "--top_p", "0.95", "--seed", "1")
  assert again.stdout == proc.stdout and other.stdout != proc.stdout


@pytest.mark.slow
def test_cli_defaults_come_from_the_runs_config_and_prompt_file_works(trained, tmp_path):
  proc = sample_cli(trained, "--num_samples", "3")  # sample.prompt "ROMEO:", 24 new tokens.
  assert proc.returncode == 0, proc.stderr[-2000:]
  samples = proc.stdout.split("---------------\n")
  assert len(samples) == 4 and samples[-1] == ""
  assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 24 + 1 for s in samples[:3])
  assert len(set(samples[:3])) == 3
  prompt_file = tmp_path / "prompt.txt"
  prompt_file.write_text("KING:\n", encoding="utf-8")
  proc = sample_cli(trained, "--prompt_file", str(prompt_file), "--temperature", "0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("KING:\n") and len(proc.stdout) == len("KING:\n") + 24 + 1


@pytest.mark.parametrize("args, fragment", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top_k", "-1"], "top_k must be >= 0"),
    (["--top_k", "1000"], "top_k=1000 is larger than the vocabulary (65 tokens)"),
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "ROMEO: ☃"], "'☃'"),
    (["--prompt_file", "/nonexistent/prompt.txt"], "cannot read --prompt_file"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
    (["--step", "3"], "no checkpoint at step 3"),
])
def test_cli_bad_input_is_a_one_line_error(trained, args, fragment):
  assert_one_line_error(sample_cli(trained, *args), fragment)


def test_cli_workdir_without_a_checkpoint(trained, tmp_path):
  assert_one_line_error(sample_cli(str(tmp_path / "missing")), "no run in")
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(os.path.join(trained, name), bare / name)
  assert json.loads((bare / "config.json").read_text())["sample"]["prompt"] == "ROMEO:"
  assert_one_line_error(sample_cli(str(bare)), "no checkpoint in")
