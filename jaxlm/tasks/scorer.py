"""Log-likelihoods of continuations, scored in batches inside jit: what every task reduces to.

A request is (context, continuation) text. It is encoded with lm-evaluation-harness's rule, so
that the tokens scored are the continuation's: trailing spaces of the context move to the
continuation, then the context is encoded alone and the whole (context + continuation) once,
and the continuation's tokens are the whole's after the context's. The model sees the last
block_size tokens of context + continuation minus the last token (truncated on the left when
longer, as lm-eval does, or refused: truncation="error") and the continuation's log-probabilities
are summed; `greedy` says whether each continuation token was the argmax.

Batches have a fixed number of rows and are right-padded to one of a few lengths (powers of two
up to block_size), so the scoring function compiles at most once per length, whatever the task.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model as model_lib
from jaxlm import tokenizers
from jaxlm.errors import JaxlmError

PyTree = Any
TRUNCATIONS = ("left", "error")


@dataclasses.dataclass(frozen=True)
class Score:
  logprob: float  # Sum over the continuation's tokens, in nats.
  greedy: bool  # Every continuation token was the model's argmax.
  tokens: int  # The continuation's tokens.


def encode_pair(tokenizer: tokenizers.Tokenizer, context: str,
                continuation: str) -> tuple[np.ndarray, np.ndarray]:
  """(context ids, continuation ids) by lm-eval's rule (see the module docstring).

  An empty context is the end-of-text token alone, as lm-eval does; a tokenizer without one
  cannot score it.
  """
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  if not context:
    if getattr(tokenizer, "eot_id", None) is None:
      raise JaxlmError("an empty context needs an end-of-text token to condition on, and "
                       f"this {tokenizer.kind} tokenizer has none")
    return np.array([tokenizer.eot_id], np.int64), np.asarray(
        tokenizer.encode(continuation), np.int64)
  whole = np.asarray(tokenizer.encode(context + continuation), np.int64)
  ctx = np.asarray(tokenizer.encode(context), np.int64)
  return ctx, whole[len(ctx):]


def buckets(block_size: int, smallest: int = 32) -> list[int]:
  """Padded lengths: powers of two from `smallest`, ending with block_size itself."""
  out, n = [], min(smallest, block_size)
  while n < block_size:
    out.append(n)
    n *= 2
  return out + [block_size]


def _score_batch(params: PyTree, inputs_BxT: jax.Array, targets_BxT: jax.Array,
                 mask_BxT: jax.Array, *, model: model_lib.DecoderLM
                 ) -> tuple[jax.Array, jax.Array]:
  """Per row: the summed log-probability of the masked targets, and whether all were argmax."""
  logits_BxTxV = model.apply({"params": params}, inputs_BxT, train=False).astype(jnp.float32)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  target_logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  hit_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  mask_BxT = mask_BxT.astype(bool)
  return (jnp.where(mask_BxT, target_logp_BxT, 0.0).sum(axis=1),
          jnp.all(hit_BxT | ~mask_BxT, axis=1))


class Scorer:
  """Scores (context, continuation) requests with one model and its params."""

  def __init__(self, model: model_lib.DecoderLM, params: PyTree,
               tokenizer: tokenizers.Tokenizer, *, batch_size: int = 32,
               truncation: str = "left", place: Callable[[np.ndarray], Any] | None = None):
    if truncation not in TRUNCATIONS:
      raise JaxlmError(f"unknown truncation {truncation!r}: expected left or error")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.block_size = model.cfg.block_size
    self.batch_size, self.truncation = batch_size, truncation
    # How host arrays reach the devices: as is (uncommitted), or e.g. replicated over a mesh.
    self.place = place or (lambda x: x)
    self._fn = jax.jit(functools.partial(_score_batch, model=model))
    self.seconds = 0.0  # Spent scoring (compilation included), for examples/s reports.

  def rows(self, ctx: np.ndarray, cont: np.ndarray, what: str = "") -> tuple[np.ndarray, int]:
    """The model's input window and the number of continuation tokens it scores at its end."""
    if not len(cont):
      raise JaxlmError(f"{what or 'a request'}: the continuation encodes to no tokens")
    whole = np.concatenate([ctx, cont])
    if len(whole) - 1 > self.block_size:
      if self.truncation == "error":
        raise JaxlmError(f"{what or 'a request'}: context + continuation are {len(whole) - 1} "
                         f"tokens, more than model.block_size={self.block_size} (truncation="
                         "'left' keeps the last block_size tokens instead)")
      if len(cont) > self.block_size:
        raise JaxlmError(f"{what or 'a request'}: the continuation alone is {len(cont)} tokens, "
                         f"more than model.block_size={self.block_size}")
      whole = whole[-(self.block_size + 1):]
    return whole, len(cont)

  def loglikelihood(self, requests: Sequence[tuple[np.ndarray, np.ndarray]],
                    names: Sequence[str] | None = None) -> list[Score]:
    """Scores encoded (context ids, continuation ids) pairs; the order of results is theirs."""
    t0 = time.perf_counter()
    prepared = [self.rows(c, x, names[i] if names else "") for i, (c, x) in
                enumerate(requests)]
    by_bucket: dict[int, list[int]] = {}
    sizes = buckets(self.block_size)
    for i, (whole, _) in enumerate(prepared):
      by_bucket.setdefault(next(b for b in sizes if b >= len(whole) - 1), []).append(i)
    scores: list[Score | None] = [None] * len(requests)
    B = self.batch_size
    for T, idx in sorted(by_bucket.items()):
      for start in range(0, len(idx), B):
        chunk = idx[start:start + B]
        inputs, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        mask = np.zeros((B, T), np.int32)
        for r, i in enumerate(chunk):
          whole, n_cont = prepared[i]
          n = len(whole) - 1
          inputs[r, :n], targets[r, :n] = whole[:-1], whole[1:]
          mask[r, n - n_cont:n] = 1
        logp, greedy = jax.device_get(self._fn(self.params, *map(self.place,
                                                                (inputs, targets, mask))))
        for r, i in enumerate(chunk):
          scores[i] = Score(float(logp[r]), bool(greedy[r]), prepared[i][1])
    self.seconds += time.perf_counter() - t0
    return scores

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[Score]:
    """The log-likelihood of each whole text, every token scored once (`rolling_windows`).

    The first token is conditioned on end-of-text (or, for a tokenizer without one, is not
    scored).
    """
    requests = []
    owners = []
    eot = getattr(self.tokenizer, "eot_id", None)
    for j, text in enumerate(texts):
      ids = np.asarray(self.tokenizer.encode(text), np.int64)
      windows = rolling_windows(ids, eot, self.block_size)
      requests += windows
      owners += [j] * len(windows)
    totals = [0.0] * len(texts)
    counts = [0] * len(texts)
    greedy = [True] * len(texts)
    for j, s in zip(owners, self.loglikelihood(requests), strict=True):
      totals[j] += s.logprob
      counts[j] += s.tokens
      greedy[j] &= s.greedy
    return [Score(t, g, n) for t, g, n in zip(totals, greedy, counts, strict=True)]


def rolling_windows(ids: np.ndarray, prefix: int | None,
                    block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(context, continuation) pairs that score each token of `ids` once, as lm-eval's
  loglikelihood_rolling does (get_rolling_token_windows with context_len=1, made disjoint).

  The first window is conditioned on `prefix` alone (None: on the first token, which is then
  not scored). Windows of block_size scored tokens follow, each seeing the token before it;
  the last, shorter one sees as many earlier tokens as fit in the block, so no token is
  predicted from less context than it needs to be.
  """
  seq = np.concatenate([[prefix], ids]) if prefix is not None else ids
  out = []
  for start in range(1, len(seq), block_size):
    end = min(start + block_size, len(seq))
    # The model sees seq[end - 1 - block_size:end - 1] and scores seq[start:end].
    out.append((seq[max(end - 1 - block_size, 0):start], seq[start:end]))
  return out
