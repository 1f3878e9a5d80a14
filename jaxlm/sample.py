"""Text generation: sampling filters, and KV-cache prefill + decode in one jitted loop.

How it works, and the choices made:
- Cache: `model.init_cache` gives one `LayerCache(k_BxGxSxK, v_BxGxSxK)` per block with
  S = block_size slots; slot s holds the key and value of the token at position s. It is an
  explicit pytree rather than flax's mutable "cache" collection, so `prefill` and `decode` are
  plain pure functions and their `DecodeState` is an ordinary value that a `lax.while_loop`
  carries and a jitted call returns.
- Batches of different prompt lengths use right padding plus per-row lengths. Because
  slot == position, the padding written by the prefill sits in slots later than any real token
  of that row; a query never sees slots after its own position, and decoding overwrites those
  slots before reaching them, so the model needs no padding mask and each row decodes at its
  own position.
- block_size: the context window slides, it never raises. nanoGPT crops to the last
  block_size tokens and re-runs the whole forward pass for every new token. Cached keys carry
  their learned absolute position embedding, so they cannot be shifted to new positions;
  instead, when a row's context fills the block, its cache is rebuilt from its last
  `slide_keep` tokens (default 3/4 of the block) with one prefill, and decoding goes on. Every
  token is therefore predicted from between `slide_keep` and block_size previous tokens;
  `slide_keep=block_size` reproduces nanoGPT's crop exactly, at a prefill per token.
- Randomness: step t samples with `fold_in(rng, t)`, so nothing random is carried and the
  text does not depend on how the decoding is split into calls.
- Streaming: `decode(params, state, num_steps)` runs at most `num_steps` more tokens in one
  `lax.while_loop`; `num_steps` is traced, so one compilation serves every chunk size.
  `sample_text` calls it in chunks and hands the new text to a callback between chunks; without
  a callback the whole generation is one call.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import memory
from jaxlm import model as model_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Sampling filters: pure functions of logits_BxV, composable in any order.
# ---------------------------------------------------------------------------------------------

def apply_temperature(logits_BxV: jax.Array, temperature: float) -> jax.Array:
  """Divides by a temperature > 0: below 1 sharpens the distribution, above 1 flattens it."""
  return logits_BxV / temperature


def top_k_logits(logits_BxV: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row (and any tied with the k-th); the rest are -inf."""
  if k == 0 or k >= logits_BxV.shape[-1]:
    return logits_BxV
  kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
  return jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)


def top_p_logits(logits_BxV: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p."""
  if p >= 1.0:
    return logits_BxV
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # Descending.
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # Token i (in sorted order) is needed while the mass of the tokens before it is below p.
  mass_BxV = jnp.cumsum(probs_BxV, axis=-1)
  mass_before_BxV = jnp.pad(mass_BxV[:, :-1], ((0, 0), (1, 0)))
  n_keep_B = jnp.sum(mass_before_BxV < p, axis=-1)  # >= 1: the first token has 0 mass before.
  cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
  return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def filter_logits(logits_BxV: jax.Array, *, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Temperature, then top-k, then top-p on what is left (the order HF transformers uses)."""
  logits_BxV = apply_temperature(logits_BxV, temperature)
  return top_p_logits(top_k_logits(logits_BxV, top_k), top_p)


def sample_token(logits_BxV: jax.Array, rng: jax.Array, *, temperature: float, top_k: int,
                 top_p: float) -> jax.Array:
  """One token per row; temperature 0 is greedy (argmax, the filters are then irrelevant)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Settings and their validation.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How to sample; hashable, so it is a static argument of the jitted functions."""
  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy.
  top_k: int = 0  # 0 = off.
  top_p: float = 1.0  # 1 = off.
  end_token: int | None = None  # A row stops after emitting it (it is kept in the output).
  slide_keep: int = 0  # Tokens kept when the window slides; 0 = block_size - block_size // 4.
  vocab_size: int = 0  # Sample only ids below this (the tokenizer's vocabulary); 0 = model's.

  @classmethod
  def from_config(cls, sample_cfg: ml_collections.ConfigDict,
                  vocab_size: int = 0) -> SampleSettings:
    """From a config's `sample` section (its prompt is not a setting: pass it separately)."""
    return cls(max_new_tokens=sample_cfg.max_new_tokens, temperature=sample_cfg.temperature,
               top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, vocab_size=vocab_size)


def validate_settings(settings: SampleSettings, cfg: model_lib.ModelConfig) -> None:
  """Raises JaxlmError naming the first impossible setting."""
  s = settings
  vocab = s.vocab_size or cfg.vocab_size
  if not 0 < vocab <= cfg.vocab_size:
    raise JaxlmError(f"sampling vocab_size={s.vocab_size} must be in [1, model.vocab_size="
                     f"{cfg.vocab_size}]")
  if s.max_new_tokens < 1:
    raise JaxlmError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
  if not s.temperature >= 0:  # Also catches NaN.
    raise JaxlmError(f"temperature must be >= 0 (0 = greedy), got {s.temperature}")
  if s.top_k < 0:
    raise JaxlmError(f"top_k must be >= 0 (0 = off), got {s.top_k}")
  if s.top_k > vocab:
    raise JaxlmError(f"top_k={s.top_k} is larger than the vocabulary ({vocab} tokens)")
  if not 0 < s.top_p <= 1:
    raise JaxlmError(f"top_p must be in (0, 1] (1 = off), got {s.top_p}")
  if s.end_token is not None and not 0 <= s.end_token < vocab:
    raise JaxlmError(f"end_token={s.end_token} is not in the vocabulary (0..{vocab - 1})")
  if not 0 <= s.slide_keep <= cfg.block_size:
    raise JaxlmError(f"slide_keep must be in [1, model.block_size={cfg.block_size}] "
                     f"(0 = default), got {s.slide_keep}")


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> right-padded prompt_BxP and lengths_B; JaxlmError for empty or unknown text."""
  if not prompts:
    raise JaxlmError("no prompts to sample from")
  ids = []
  for text in prompts:
    if not text:
      raise JaxlmError("the prompt is empty: sampling needs at least one token to start from")
    ids.append(tokenizer.encode(text))  # Names any characters the tokenizer does not know.
  lengths_B = np.array([len(x) for x in ids], dtype=np.int32)
  prompt_BxP = np.zeros((len(ids), int(lengths_B.max())), dtype=np.int32)
  for b, x in enumerate(ids):
    prompt_BxP[b, :len(x)] = x
  return prompt_BxP, lengths_B


# ---------------------------------------------------------------------------------------------
# Pure prefill and decode.
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class DecodeState:
  """Everything a decode loop carries; arrays only. T = P + max_new_tokens."""
  tokens_BxT: jax.Array  # Prompt then generated tokens; row b is valid up to lengths_B[b].
  lengths_B: jax.Array  # Tokens in each row so far.
  prompt_lengths_B: jax.Array
  start_B: jax.Array  # Index in tokens_BxT of the token in cache slot 0 (moves when sliding).
  cache: model_lib.Cache
  logits_BxV: jax.Array  # Next-token logits, float32.
  done_B: jax.Array  # Row emitted the end token.
  step: jax.Array  # Decode steps taken (tokens generated by a row that is not done).
  rng: jax.Array  # Base key; step t uses fold_in(rng, t).


def _slide_keep(settings: SampleSettings, cfg: model_lib.ModelConfig) -> int:
  return settings.slide_keep or cfg.block_size - cfg.block_size // 4


def _encode_window(params: PyTree, tokens_BxT: jax.Array, start_B: jax.Array,
                   end_B: jax.Array, width: int, *, model: model_lib.DecoderLM,
                   vocab_size: int) -> tuple[jax.Array, model_lib.Cache]:
  """A fresh cache for tokens [start, end) of each row (end - start <= width), and the logits
  that follow the row's last token. Positions in the window start again at 0."""
  B, T = tokens_BxT.shape
  index_BxW = jnp.clip(start_B[:, None] + jnp.arange(width)[None, :], 0, T - 1)
  window_BxW = jnp.take_along_axis(tokens_BxT, index_BxW, axis=1)
  positions_BxW = jnp.broadcast_to(jnp.arange(width)[None, :], (B, width))
  logits_BxWxV, cache = model.apply(
      {"params": params}, window_BxW, positions_BxL=positions_BxW,
      cache=model_lib.init_cache(model.cfg, B))
  last_logits_BxV = logits_BxWxV[jnp.arange(B), end_B - start_B - 1]
  return last_logits_BxV[:, :vocab_size], cache


def prefill(params: PyTree, prompt_BxP: jax.Array, prompt_lengths_B: jax.Array,
            rng: jax.Array, *, model: model_lib.DecoderLM, settings: SampleSettings) -> DecodeState:
  """Encodes the prompts (right-padded, lengths >= 1) in one forward pass."""
  cfg = model.cfg
  B, P = prompt_BxP.shape
  tokens_BxT = jnp.pad(prompt_BxP.astype(jnp.int32), ((0, 0), (0, settings.max_new_tokens)))
  lengths_B = prompt_lengths_B.astype(jnp.int32)
  # A prompt longer than the block keeps its last block_size tokens.
  start_B = jnp.maximum(lengths_B - cfg.block_size, 0)
  logits_BxV, cache = _encode_window(
      params, tokens_BxT, start_B, lengths_B, min(P, cfg.block_size), model=model,
      vocab_size=settings.vocab_size or cfg.vocab_size)
  return DecodeState(tokens_BxT=tokens_BxT, lengths_B=lengths_B, prompt_lengths_B=lengths_B,
                     start_B=start_B, cache=cache, logits_BxV=logits_BxV,
                     done_B=jnp.zeros((B,), bool), step=jnp.zeros((), jnp.int32), rng=rng)


def decode(params: PyTree, state: DecodeState, num_steps: jax.Array, *, model: model_lib.DecoderLM,
           settings: SampleSettings) -> DecodeState:
  """Up to `num_steps` more tokens (fewer at max_new_tokens, or once every row is done)."""
  cfg, s = model.cfg, settings
  B = state.tokens_BxT.shape[0]
  S, keep = cfg.block_size, _slide_keep(settings, cfg)
  vocab_size = s.vocab_size or cfg.vocab_size
  rows_B = jnp.arange(B)
  stop = jnp.minimum(state.step + num_steps, s.max_new_tokens)

  def keep_going(st: DecodeState) -> jax.Array:
    return (st.step < stop) & ~jnp.all(st.done_B)

  def full_B(st: DecodeState) -> jax.Array:
    """Rows whose window has no slot left for their next token."""
    return ~st.done_B & (st.lengths_B - st.start_B >= S)

  def slide(st: DecodeState) -> DecodeState:
    """Rebuilds the cache of every full row from its last keep - 1 tokens, so that its next
    token lands at position keep - 1. The next-token logits, computed over the full window,
    stay as they are."""
    new_start_B = st.lengths_B - (keep - 1)
    if keep > 1:
      _, cache = _encode_window(params, st.tokens_BxT, new_start_B, st.lengths_B, keep - 1,
                                model=model, vocab_size=vocab_size)
    else:
      cache = model_lib.init_cache(cfg, B)
    slide_B = full_B(st)
    pick = lambda new, old: jnp.where(slide_B.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
    return st.replace(cache=jax.tree.map(pick, cache, st.cache),
                      start_B=jnp.where(slide_B, new_start_B, st.start_B))

  def one_token(st: DecodeState) -> DecodeState:
    token_B = sample_token(st.logits_BxV, jax.random.fold_in(st.rng, st.step),
                           temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    active_B = ~st.done_B
    token_B = jnp.where(active_B, token_B, 0)
    tokens_BxT = st.tokens_BxT.at[rows_B, st.lengths_B].set(token_B)
    done_B = st.done_B
    if s.end_token is not None:
      done_B = done_B | (active_B & (token_B == s.end_token))
    # Finished rows feed a dummy token at position 0: their cache is never read again.
    position_B = jnp.where(active_B, st.lengths_B - st.start_B, 0)
    logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None],
                                      positions_BxL=position_B[:, None], cache=st.cache)
    return st.replace(tokens_BxT=tokens_BxT, lengths_B=st.lengths_B + active_B.astype(jnp.int32),
                      cache=cache, logits_BxV=logits_Bx1xV[:, 0, :vocab_size], done_B=done_B,
                      step=st.step + 1)

  def segment(st: DecodeState) -> DecodeState:
    # Sliding sits outside the per-token loop so that the loop body has no conditional and
    # XLA updates the cache in place (with a lax.cond in the per-token body, the compiled
    # loop copied every layer's cache on every token).
    st = jax.lax.cond(jnp.any(full_B(st)), slide, lambda st: st, st)
    return jax.lax.while_loop(lambda st: keep_going(st) & ~jnp.any(full_B(st)), one_token, st)

  return jax.lax.while_loop(keep_going, segment, state)


def new_tokens(state: DecodeState, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
  """The generated tokens, aligned: (tokens_BxM, counts_B); entries past a row's count are -1."""
  index_BxM = state.prompt_lengths_B[:, None] + jnp.arange(max_new_tokens)[None, :]
  tokens_BxM = jnp.take_along_axis(state.tokens_BxT, index_BxM, axis=1)
  counts_B = state.lengths_B - state.prompt_lengths_B
  valid_BxM = jnp.arange(max_new_tokens)[None, :] < counts_B[:, None]
  return jnp.where(valid_BxM, tokens_BxM, -1), counts_B


def generate(params: PyTree, prompt_BxP: jax.Array, rng: jax.Array, *, model: model_lib.DecoderLM,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             end_token: int | None = None, slide_keep: int = 0,
             prompt_lengths_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Samples up to max_new_tokens after each prompt: (tokens_BxM, counts_B) as `new_tokens`.

  Pure; jit it with everything but params, prompt_BxP, rng and prompt_lengths_B bound (e.g.
  with functools.partial). prompt_lengths_B gives each row's real length in the right-padded
  prompt_BxP (default: every row is P tokens long).
  """
  settings = SampleSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, end_token=end_token,
                            slide_keep=slide_keep)
  validate_settings(settings, model.cfg)
  B, P = prompt_BxP.shape
  if prompt_lengths_B is None:
    prompt_lengths_B = jnp.full((B,), P, jnp.int32)
  state = prefill(params, prompt_BxP, prompt_lengths_B, rng, model=model, settings=settings)
  state = decode(params, state, jnp.int32(max_new_tokens), model=model, settings=settings)
  return new_tokens(state, max_new_tokens)


# ---------------------------------------------------------------------------------------------
# Text in, text out: the host side used by `jaxlm sample` and the training loop.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampler:
  """Jitted prefill and decode for one model and one set of settings (compiled on first use)."""
  settings: SampleSettings
  prefill: Callable[[PyTree, jax.Array, jax.Array, jax.Array], DecodeState]
  decode: Callable[[PyTree, DecodeState, jax.Array], DecodeState]
  cfg: model_lib.ModelConfig | None = None  # The model's: its block size bounds nothing, but
  # sample_text's memory check names it.


def make_sampler(model: model_lib.DecoderLM, settings: SampleSettings) -> Sampler:
  """Validates `settings` (JaxlmError) and jits prefill and decode for them: the jit boundary."""
  validate_settings(settings, model.cfg)
  return Sampler(
      settings=settings, cfg=model.cfg,
      prefill=jax.jit(functools.partial(prefill, model=model, settings=settings)),
      # The state is donated: the cache is updated in place from one chunk to the next.
      decode=jax.jit(functools.partial(decode, model=model, settings=settings),
                     donate_argnums=(1,)))


@dataclasses.dataclass(frozen=True)
class SampleResult:
  texts: list[str]  # The generated continuation of each prompt (without the prompt).
  num_tokens: int  # Generated tokens, summed over the prompts.
  seconds: float  # Prefill and decoding, compilation excluded.
  compile_seconds: float
  interrupted: bool = False  # Stopped early by `should_stop`: the texts are shorter.

  @property
  def tokens_per_sec(self) -> float:
    return self.num_tokens / max(self.seconds, 1e-9)


# Host and device bytes per generated token of each sample: the int32 token buffer on the
# device, its copies on the host and the decoded Python text (up to 4 bytes a character, plus
# the tokenizer's intermediate lists).
BYTES_PER_TOKEN = 32
MAX_POSITIONS = 2**31 - 1  # Token indices and lengths are int32.


def check_fits(settings: SampleSettings, cfg: model_lib.ModelConfig, num_samples: int,
               prompt_len: int) -> None:
  """Refuses a max_new_tokens whose buffers would not fit in memory (JaxlmError), before
  anything is allocated: the generation would otherwise grow until the kernel kills it."""
  m = settings.max_new_tokens
  window = (f"(the model attends to its last model.block_size={cfg.block_size} tokens; a longer "
            "sample slides that window)")
  if prompt_len + m > MAX_POSITIONS:
    raise JaxlmError(f"max_new_tokens={m} is more than one sample can hold: prompt and sample "
                     f"together must stay under {MAX_POSITIONS} tokens {window}")
  budget = memory.available_bytes() // 2  # Leave room for everything else.
  need = num_samples * (prompt_len + m) * BYTES_PER_TOKEN
  if budget and need > budget:
    most = max(budget // (num_samples * BYTES_PER_TOKEN) - prompt_len, 0)
    raise JaxlmError(f"max_new_tokens={m} needs about {need / 2**30:.1f} GiB for "
                     f"{num_samples} sample(s), more than half of the memory available: at "
                     f"most {most} tokens per sample here {window}")


def sample_text(sampler: Sampler, params: PyTree, tokenizer: Any, prompts: Sequence[str],
                rng: jax.Array, *, on_text: Callable[[str], None] | None = None,
                chunk_tokens: int = 16,
                should_stop: Callable[[], bool] | None = None) -> SampleResult:
  """Continues each prompt. With `on_text`, decodes `chunk_tokens` at a time and passes the
  first row's new text to it as soon as each chunk is done (streaming).

  `should_stop` (e.g. "Ctrl-C was pressed") is asked between chunks, when no computation is in
  flight; when it says yes the texts so far are returned with `interrupted` set. Without
  streaming the chunks are larger, so that it is still asked now and then.
  """
  prompt_BxP, lengths_B = encode_prompts(tokenizer, prompts)
  max_new = sampler.settings.max_new_tokens
  check_fits(sampler.settings, sampler.cfg, len(prompts), prompt_BxP.shape[1])
  if on_text is not None:
    chunk = np.int32(chunk_tokens)
  else:
    chunk = np.int32(max_new if should_stop is None else min(max_new, 64 * chunk_tokens))
  interrupted = False

  t0 = time.perf_counter()
  prefill_fn = sampler.prefill.lower(params, prompt_BxP, lengths_B, rng).compile()
  abstract_state = jax.eval_shape(sampler.prefill, params, prompt_BxP, lengths_B, rng)
  decode_fn = sampler.decode.lower(params, abstract_state, chunk).compile()
  compile_seconds = time.perf_counter() - t0

  t0 = time.perf_counter()
  state = prefill_fn(params, prompt_BxP, lengths_B, rng)
  shown = ""
  while True:
    state = decode_fn(params, state, chunk)
    step, done_B = jax.device_get((state.step, state.done_B))  # One host sync per chunk.
    finished = int(step) >= max_new or bool(np.all(done_B))
    if on_text is not None:
      tokens_T, n = jax.device_get((state.tokens_BxT[0], state.lengths_B[0]))
      text = tokenizer.decode(tokens_T[lengths_B[0]:n])
      if not finished:
        # A byte tokenizer may be in the middle of a UTF-8 sequence: hold back its
        # replacement character until the rest of the bytes arrive.
        text = text.rstrip("\ufffd")
      if text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown):])
        shown = text
    if finished:
      break
    if should_stop is not None and should_stop():
      interrupted = True
      break
  tokens_BxT, counts_B = jax.device_get((state.tokens_BxT, state.lengths_B - lengths_B))
  seconds = time.perf_counter() - t0
  texts = [tokenizer.decode(tokens_BxT[b, lengths_B[b]:lengths_B[b] + counts_B[b]])
           for b in range(len(prompts))]
  return SampleResult(texts=texts, num_tokens=int(np.sum(counts_B)), seconds=seconds,
                      compile_seconds=compile_seconds, interrupted=interrupted)


def append_samples(path: str | os.PathLike, step: int, prompt: str,
                   texts: Sequence[str]) -> None:
  """Appends `== step N ==` and each prompt + continuation to a text file (samples.txt)."""
  workdir_lib.append_text(path, f"== step {step} ==\n" + "".join(
      prompt + text + "\n" for text in texts))
