"""Training and evaluation rows from prepared token stores: mixtures, windows or documents.

Each row of the global batch at step s is drawn from one counter-based generator keyed by
(seed, stream, step): first the source of every row (by the mixture weights), then a uniform
number per row that picks where in that source the row starts. A process takes its own rows of
that global batch, so the batch does not depend on how many processes share it, and resuming
needs only the step. Rows are block_size + 1 tokens from the source's contiguous range in the
store (prepare writes each source's documents together):

  windows    starting at any token (nanoGPT)
  documents  starting at the first token of a document (nanochat); the row runs on into the
             documents after it when the document is shorter than the row
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxlm import tokenizers
from jaxlm.corpus import prepare as prepare_lib
from jaxlm.corpus import spec as spec_lib
from jaxlm.corpus import store as store_lib
from jaxlm.errors import JaxlmError

# The same stream numbers as jaxlm/data.py, so the two pipelines read alike.
TRAIN_STREAM = 0
EVAL_TRAIN_STREAM = 1
EVAL_VAL_STREAM = 2

Batch = dict[str, np.ndarray]
BatchFn = Callable[..., Batch]


@dataclasses.dataclass(frozen=True)
class Split:
  """One store's sources as token ranges [lo, hi) and the document starts inside them."""
  store: store_lib.Store
  lo: np.ndarray  # int64[S]
  hi: np.ndarray  # int64[S]
  doc_starts: tuple[np.ndarray, ...]  # Per source: starts of its documents, ascending.

  @classmethod
  def of(cls, store: store_lib.Store, n_sources: int) -> Split:
    starts = np.append(store.documents["start"], store.num_tokens)
    lo, hi, docs = np.zeros(n_sources, np.int64), np.zeros(n_sources, np.int64), []
    for s in range(n_sources):
      idx = store.source_documents(s)
      if len(idx):
        if np.any(np.diff(idx) != 1):
          raise JaxlmError(f"token store {store.directory}: the documents of source {s} are "
                           "not contiguous (not a store made by jaxlm prepare)")
        lo[s], hi[s] = starts[idx[0]], starts[idx[-1] + 1]
      docs.append(np.asarray(starts[idx], dtype=np.int64))
    return cls(store, lo, hi, tuple(docs))

  def tokens(self, s: int) -> int:
    return int(self.hi[s] - self.lo[s])


class StoreData:
  """The data of a `data.sources` config: the same interface as data.Dataset."""

  def __init__(self, prepared: prepare_lib.Prepared, spec: spec_lib.DataSpec, block_size: int):
    self.spec, self.block_size = spec, block_size
    self.directory = prepared.directory
    self.tokenizer: tokenizers.Tokenizer = prepared.tokenizer
    self.names = [s.name for s in spec.sources]
    n = len(self.names)
    self.train, self.val = Split.of(prepared.train, n), Split.of(prepared.val, n)
    for split, which in ((self.train, "training"), (self.val, "validation")):
      for s, src in enumerate(spec.sources):
        if (which == "validation" or src.weight > 0) and split.tokens(s) < block_size + 1:
          raise JaxlmError(
              f"source {src.name!r} has {split.tokens(s):,} {which} tokens but "
              f"model.block_size={block_size} needs at least {block_size + 1}: give it more "
              f"documents{' or a larger data.val_fraction' if which == 'validation' else ''}")
    self.weights = np.array(spec.weights, dtype=np.float64)
    # A document may start a row when a whole row fits before its source ends.
    self._doc_candidates = [
        (int(np.searchsorted(d, self.train.hi[s] - block_size - 1, side="right")),
         int(np.searchsorted(self.val.doc_starts[s], self.val.hi[s] - block_size - 1,
                             side="right")))
        for s, d in enumerate(self.train.doc_starts)]

  @property
  def source(self) -> str:
    return self.directory

  def summary(self) -> str:
    return (f"token store {self.directory} | tokenizer {self.tokenizer.kind}, vocab "
            f"{self.tokenizer.vocab_size:,} | train {self.train.store.num_tokens:,} tokens, val "
            f"{self.val.store.num_tokens:,} tokens | rows: {self.spec.rows}")

  def mixture(self, steps: int, batch_size: int) -> list[str]:
    """Per source: its share of the rows and how many epochs of its tokens the run reads."""
    per_step = batch_size * self.block_size
    lines = []
    for s, name in enumerate(self.names):
      read = steps * per_step * self.weights[s]
      tokens = self.train.tokens(s)
      epochs = read / tokens if tokens else 0.0
      lines.append(f"{name} {100 * self.weights[s]:.1f}% of rows, {tokens:,} tokens, "
                   f"{epochs:.3g} epochs" if self.weights[s] else
                   f"{name} 0% (evaluated only)")
    return lines

  # -- rows ------------------------------------------------------------------------------------

  def draw(self, split: Split, weights: np.ndarray, key: list[int],
           batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, first token) of every row of the global batch drawn from generator `key`."""
    rng = np.random.default_rng(key)
    n = len(weights)
    source_B = (rng.choice(n, size=batch_size, p=weights) if n > 1
                else np.zeros(batch_size, np.int64))
    u_B = rng.random(batch_size)
    if self.spec.rows == "windows":  # Any start with a whole row before the source ends.
      span = split.hi - split.lo - self.block_size
      return source_B, split.lo[source_B] + (u_B * span[source_B]).astype(np.int64)
    col = 0 if split is self.train else 1
    counts = np.array([c[col] for c in self._doc_candidates], dtype=np.int64)
    pick = (u_B * counts[source_B]).astype(np.int64)
    return source_B, np.array([split.doc_starts[s][p] for s, p in zip(source_B, pick,
                                                                        strict=True)],
                              dtype=np.int64).reshape(batch_size)

  def rows(self, split: Split, weights: np.ndarray, key: list[int], batch_size: int, *,
           process_index: int = 0, process_count: int = 1) -> Batch:
    """This process' rows of the global batch drawn from generator `key`."""
    if batch_size % process_count:
      raise JaxlmError(f"train.batch_size={batch_size} is not divisible by the "
                       f"{process_count} processes")
    _, start_B = self.draw(split, weights, key, batch_size)
    per_host = batch_size // process_count
    starts = start_B[process_index * per_host:(process_index + 1) * per_host]
    L = self.block_size
    window_bxL = np.stack([split.store.tokens(int(a), int(a) + L + 1) for a in starts])
    window_bxL = window_bxL.astype(np.int32)
    return {"inputs": window_bxL[:, :-1], "targets": window_bxL[:, 1:]}

  def train_batch(self, *, seed: int, step: int, batch_size: int, block_size: int,
                  process_index: int = 0, process_count: int = 1) -> Batch:
    self._check(block_size)
    return self.rows(self.train, self.weights, [seed, TRAIN_STREAM, step], batch_size,
                     process_index=process_index, process_count=process_count)

  def eval_sets(self) -> dict[str, BatchFn]:
    """Named evaluation batch functions f(seed=, step=, batch_size=, block_size=, ...):
    train and val (the training mixture) and, with several sources, val/<source> each."""
    def make(split: Split, weights: np.ndarray, stream: list[int]) -> BatchFn:
      def fn(*, seed: int, step: int, batch_size: int, block_size: int,
             process_index: int = 0, process_count: int = 1) -> Batch:
        self._check(block_size)
        return self.rows(split, weights, [seed, *stream, step], batch_size,
                         process_index=process_index, process_count=process_count)
      return fn
    sets = {"train": make(self.train, self.weights, [EVAL_TRAIN_STREAM]),
            "val": make(self.val, self.weights, [EVAL_VAL_STREAM])}
    if len(self.names) > 1:
      for s, name in enumerate(self.names):
        one = np.eye(len(self.names))[s]
        sets[f"val/{name}"] = make(self.val, one, [EVAL_VAL_STREAM, 1 + s])
    return sets

  def aliases(self) -> dict[str, str]:
    """Metric prefixes that equal another's: one source's val/<name> is val itself."""
    return {f"val/{self.names[0]}": "val"} if len(self.names) == 1 else {}

  def _check(self, block_size: int) -> None:
    if block_size != self.block_size:
      raise JaxlmError(f"block_size={block_size}, but this data was checked for "
                       f"{self.block_size}")


def load(spec: spec_lib.DataSpec, block_size: int, *, log=print,
         rebuild: bool = False) -> StoreData:
  """Opens (preparing first if needed) the stores of `spec` as rows of block_size + 1."""
  return StoreData(prepare_lib.open_or_prepare(spec, log=log, rebuild=rebuild), spec,
                   block_size)
