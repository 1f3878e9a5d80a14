"""lm-evaluation-harness backend: the model "jaxlm", a trained run scored and sampled by jaxlm.

  python -m jaxlm.lm_eval_backend --model jaxlm --model_args workdir=runs/x,step=best \
      --tasks hellaswag --batch_size 32

Importing this module registers "jaxlm" in lm-eval's model registry. lm-eval (0.4.13) finds
models only there and loads no plugins (it has no entry point group), so the `lm_eval` command
alone cannot know "jaxlm"; jaxlm/lm_eval_backend.py imports this module, then runs lm-eval's
command line. From Python: import this module, then lm_eval.simple_evaluate(model="jaxlm",
model_args=...) or model=JaxlmLM(workdir=...).

The three request types reuse jaxlm's own pieces: loglikelihood and loglikelihood_rolling go
through jaxlm.tasks.scorer (lm-eval's tokenization rule and rolling windows, batched, jitted),
generate_until through the KV-cache sampler, decoded in chunks and cut at the first stop
sequence.

Model arguments: workdir (required); step (latest, best or a number; default latest);
truncation (left: keep the last block_size tokens, as lm-eval's HF backend does; error: refuse);
max_gen_toks (default 256, when a task does not set it); seed (for tasks that sample).
lm-eval's batch_size is the number of rows per compiled call (auto = 32), rounded up to a
multiple of the devices, over which the rows are split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxlm import runs, sample
from jaxlm.errors import JaxlmError
from jaxlm.tasks import scorer as scorer_lib

INSTALL_HINT = "the lm-eval backend needs lm-evaluation-harness: pip install 'jaxlm[eval]'"
try:
  import lm_eval.api.model
  import lm_eval.api.registry

  # The built-in models register lazily when lm-eval first looks one up in an empty
  # registry; once "jaxlm" is in it that never happens, so register them now.
  import lm_eval.models  # noqa: F401
except ImportError:
  raise JaxlmError(INSTALL_HINT) from None

NAME = "jaxlm"
DEFAULT_BATCH_SIZE = 32
CHUNK_TOKENS = 16  # Generated between checks for stop sequences.
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GENERATION_KEYS = ("until", "do_sample", "temperature", "top_k", "top_p") + MAX_TOKEN_KEYS


def parse_step(step: int | str | None) -> int | str | None:
  """The step model argument as runs.load_run takes it."""
  if step is None or step in ("latest", "best"):
    return step
  try:
    return int(step)
  except ValueError:
    raise JaxlmError(f"step must be a number, 'latest' or 'best', got {step!r}") from None


def parse_batch_size(batch_size: int | str | None) -> int:
  """lm-eval's batch_size (an int, a digit string, 'auto' or 'auto:N') as rows per call."""
  if batch_size is None or str(batch_size).startswith("auto"):
    return DEFAULT_BATCH_SIZE  # lm-eval's probing for the largest batch is torch's business.
  try:
    value = int(batch_size)
  except ValueError:
    raise JaxlmError(f"batch_size must be a number or 'auto', got {batch_size!r}") from None
  if value < 1:
    raise JaxlmError(f"batch_size must be >= 1, got {value}")
  return value


def cut_at_stop(text: str, until: Sequence[str]) -> tuple[str, bool]:
  """The text before the first stop sequence, and whether one was found."""
  ends = [i for s in until if s and (i := text.find(s)) >= 0]
  return (text[:min(ends)], True) if ends else (text, False)


def generation_settings(gen_kwargs: dict[str, Any], default_max: int, vocab_size: int,
                        end_token: int | None) -> tuple[list[str], sample.SampleSettings]:
  """(stop sequences, sampler settings) of a request's generation kwargs, as lm-eval's HF
  backend reads them: the first max-token key set wins, do_sample=False means greedy, and a
  temperature of 0 (the default) is greedy too."""
  until = gen_kwargs.get("until") or []
  until = [until] if isinstance(until, str) else list(until)
  max_new = next((int(gen_kwargs[k]) for k in MAX_TOKEN_KEYS if gen_kwargs.get(k) is not None),
                 default_max)
  temperature = float(gen_kwargs.get("temperature") or 0.0)
  if gen_kwargs.get("do_sample") is False:
    temperature = 0.0
  ignored = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
  if ignored:
    logging.warning("jaxlm backend: ignoring generation kwargs %s", ", ".join(ignored))
  settings = sample.SampleSettings(
      max_new_tokens=max_new, temperature=temperature, top_k=int(gen_kwargs.get("top_k") or 0),
      top_p=float(gen_kwargs.get("top_p") or 1.0), end_token=end_token, vocab_size=vocab_size)
  return until, settings


@lm_eval.api.registry.register_model(NAME)
class JaxlmLM(lm_eval.api.model.LM):
  """A jaxlm run (a workdir's checkpoint) as an lm-eval model."""

  def __init__(self, workdir: str | None = None, step: int | str | None = None, *,
               batch_size: int | str | None = None, max_batch_size: int | None = None,
               device: str | None = None, truncation: str = "left", max_gen_toks: int = 256,
               seed: int = 0, **unknown: Any):
    super().__init__()
    # max_batch_size and device are lm-eval's settings for torch models; JAX places the
    # computation on its own default devices.
    del max_batch_size, device
    if unknown:
      raise JaxlmError(f"unknown jaxlm model argument {sorted(unknown)[0]!r}: it takes workdir, "
                       "step, truncation, max_gen_toks and seed")
    if not workdir:
      raise JaxlmError("the jaxlm model needs --model_args workdir=DIR[,step=N|best]")
    self.workdir = workdir
    self.run = runs.load_run(workdir, parse_step(step))
    self.tokenizer = self.run.tokenizer
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    mesh = jax.tree.leaves(self.run.params)[0].sharding.mesh
    n = mesh.devices.size
    self.batch_size = -(-parse_batch_size(batch_size) // n) * n
    # Rows split over the devices the params are replicated on (load_run's data mesh).
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    self.place = lambda x: jax.device_put(x, rows)  # Host batch -> devices.
    self.scorer = scorer_lib.Scorer(self.run.model, self.run.params, self.tokenizer,
                                    batch_size=self.batch_size, truncation=truncation,
                                    place=self.place)
    self._samplers: dict[sample.SampleSettings, sample.Sampler] = {}
    logging.info("jaxlm backend: %s at step %d, %d rows per call", workdir, self.run.step,
                 self.batch_size)

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records about the model in its results."""
    return {"workdir": self.workdir, "step": self.run.step,
            "family": self.run.cfg.model.family, "block_size": self.run.mcfg.block_size}

  # --- Log-likelihoods ---------------------------------------------------------------------------
  def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    pairs = [scorer_lib.encode_pair(self.tokenizer, *req.args) for req in requests]
    names = [f"task {req.task_name!r} document {req.doc_id}" for req in requests]
    out = [(s.logprob, s.greedy) for s in self.scorer.loglikelihood(pairs, names)]
    for req, answer in zip(requests, out, strict=True):
      self.cache_hook.add_partial("loglikelihood", req.args, answer)
    return out

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                            ) -> list[float]:
    if self.tokenizer.eot_id is None:
      logging.warning("jaxlm backend: this %s tokenizer has no end-of-text token to condition "
                      "a document's first token on, so that token is not scored",
                      self.tokenizer.kind)
    texts = [req.args[0] for req in requests]
    out = [s.logprob for s in self.scorer.loglikelihood_rolling(texts)]
    for req, answer in zip(requests, out, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, answer)
    return out

  # --- Generation --------------------------------------------------------------------------------
  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    out: list[str] = [""] * len(requests)
    groups: dict[str, list[int]] = {}  # Requests with the same generation kwargs.
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    for idx in groups.values():
      until, settings = generation_settings(requests[idx[0]].args[1], self.max_gen_toks,
                                            self.tokenizer.vocab_size, self.tokenizer.eot_id)
      texts = self.generate([requests[i].args[0] for i in idx], until, settings)
      for i, text in zip(idx, texts, strict=True):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def generate(self, contexts: Sequence[str], until: Sequence[str],
               settings: sample.SampleSettings) -> list[str]:
    """Each context's continuation, up to the first stop sequence (not included), an
    end-of-text token or settings.max_new_tokens tokens."""
    block = self.run.mcfg.block_size
    # As lm-eval's HF backend: the prompt leaves room for max_new_tokens in the block, so the
    # window never has to slide (when they do not fit, the sampler slides it).
    keep = block - settings.max_new_tokens if settings.max_new_tokens < block else block
    prompts = [self._prompt_ids(c)[-keep:] for c in contexts]
    if settings not in self._samplers:
      self._samplers[settings] = sample.make_sampler(self.run.model, settings)
    sampler = self._samplers[settings]
    out = [""] * len(contexts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # Similar lengths.
    B = self.batch_size
    for start in range(0, len(order), B):
      chunk = order[start:start + B]
      texts = self._generate_batch([prompts[i] for i in chunk], until, sampler)
      for i, text in zip(chunk, texts, strict=True):
        out[i] = text
    return out

  def _prompt_ids(self, context: str) -> np.ndarray:
    if context:
      return np.asarray(self.tokenizer.encode(context), np.int32)
    if self.tokenizer.eot_id is None:
      raise JaxlmError("an empty context needs an end-of-text token to start from, and this "
                       f"{self.tokenizer.kind} tokenizer has none")
    return np.array([self.tokenizer.eot_id], np.int32)

  def _generate_batch(self, prompts: list[np.ndarray], until: Sequence[str],
                      sampler: sample.Sampler) -> list[str]:
    B, n = self.batch_size, len(prompts)
    P = next(b for b in scorer_lib.buckets(self.run.mcfg.block_size)
             if b >= max(len(p) for p in prompts))
    # Padding rows hold one token; their output is dropped.
    prompt_BxP = np.zeros((B, P), np.int32)
    lengths_B = np.ones((B,), np.int32)
    for b, p in enumerate(prompts):
      prompt_BxP[b, :len(p)], lengths_B[b] = p, len(p)
    state = sampler.prefill(self.run.params, self.place(prompt_BxP), self.place(lengths_B),
                            jax.random.key(self.seed))
    max_new = sampler.settings.max_new_tokens
    texts, finished = [""] * n, [False] * n
    while True:
      state = sampler.decode(self.run.params, state, np.int32(CHUNK_TOKENS))
      tokens_BxT, ends_B, done_B, step = jax.device_get(
          (state.tokens_BxT, state.lengths_B, state.done_B, state.step))
      for b in range(n):
        if finished[b]:
          continue
        new = tokens_BxT[b, lengths_B[b]:ends_B[b]]
        if done_B[b]:
          new = new[:-1]  # The end-of-text token that stopped the row.
        texts[b], stopped = cut_at_stop(self.tokenizer.decode(new), until)
        finished[b] = stopped or bool(done_B[b])
      if all(finished) or int(step) >= max_new:
        return texts
