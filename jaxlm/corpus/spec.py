"""What `data.sources` asks for, checked before anything is read: sources, weights, the store.

    c.data.sources.web = defaults.source("~/fw/*.jsonl.zst", weight=0.7)
    c.data.sources.code = defaults.source("~/code/*.parquet", weight=0.3,
                                          val_path="~/code-val/*.parquet")

(defaults.source fills in every key, so each can be overridden on the command line:
--config.data.sources.code.weight=0.5.) Sources are taken in the order of their names.

A source's keys (all but `path` optional):
  path        documents to train on: a file, directory or glob, local or gs:// (sources.py)
  weight      its share of the training rows, relative to the other weights (default 1);
              0 = evaluated only
  val_path    separate validation documents; "" = hold out data.val_fraction of path's
              documents (chosen by a hash of the document's position, spread over the source)
  kind        auto | text | jsonl | parquet | hf_disk (default auto: from the extension)
  text_field  the JSONL field / Parquet or dataset column of the text (default "text")

With no sources, `data.path` is the simple one-source form read by jaxlm/data.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import ml_collections

from jaxlm import tokenizers
from jaxlm import workdir as workdir_lib
from jaxlm.corpus import sources as sources_lib
from jaxlm.corpus import store
from jaxlm.errors import JaxlmError

ROWS = ("windows", "documents")
SOURCE_KEYS = ("path", "weight", "val_path", "kind", "text_field")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")  # A source name becomes a metric key segment.
# Bumped when what `prepare` writes for the same spec changes, so old stores are not reused.
PREPARE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  path: str
  weight: float
  val_path: str
  kind: str
  text_field: str


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """`cfg.data` in the sources form, validated (no file is touched)."""
  sources: tuple[SourceSpec, ...]
  tokenizer: str  # char | byte | bpe | the path of a tokenizer.json.
  vocab_size: int  # Of a trained bpe.
  bpe_sample_bytes: int
  val_fraction: float
  rows: str
  on_bad_record: str
  store: str  # The store directory, "" = keyed in the cache.
  cache_dir: str

  @property
  def weights(self) -> list[float]:
    """Training shares, summing to 1."""
    total = sum(s.weight for s in self.sources)
    return [s.weight / total for s in self.sources]


def uses_sources(cfg: ml_collections.ConfigDict) -> bool:
  """True when the config names sources (the store pipeline), False for data.path."""
  return bool("sources" in cfg.data and len(cfg.data.sources))


def from_config(cfg: ml_collections.ConfigDict) -> DataSpec:
  """The DataSpec of `cfg.data`; a one-line JaxlmError for the first bad value."""
  d = cfg.data
  if d.path:
    raise JaxlmError(f"data.path={d.path!r} and data.sources are both set: data.path is the "
                     "one-source form; make it a source instead (data.sources.<name>.path)")
  specs = []
  for name, s in d.sources.items():
    if not isinstance(s, ml_collections.ConfigDict):
      raise JaxlmError(f"data.sources.{name} must be a ConfigDict of {', '.join(SOURCE_KEYS)}, "
                       f"got {type(s).__name__}")
    unknown = sorted(set(s.keys()) - set(SOURCE_KEYS))
    if unknown:
      raise JaxlmError(f"data.sources.{name} has unknown key {unknown[0]!r}: a source has "
                       f"{', '.join(SOURCE_KEYS)}")
    if not _NAME_RE.match(name):
      raise JaxlmError(f"data.sources.{name}: a source name may hold only letters, digits, "
                       "'_', '.' and '-' (it names metrics such as val/<name>/loss)")
    weight = float(s.get("weight", 1.0))
    if not weight >= 0:  # Also refuses NaN.
      raise JaxlmError(f"data.sources.{name}.weight={weight} is negative: weights are >= 0 "
                       "(0 = evaluate the source, never train on it)")
    path, val_path = str(s.get("path", "")), str(s.get("val_path", ""))
    if not path and not (val_path and weight == 0):
      raise JaxlmError(f"data.sources.{name}.path is empty: give the files to read (only an "
                       "evaluation source, weight=0 with a val_path, may leave it empty)")
    kind = str(s.get("kind", "auto"))
    if kind not in ("auto", *sources_lib.KINDS):
      raise JaxlmError(f"data.sources.{name}.kind={kind!r}: expected auto, "
                       f"{', '.join(sources_lib.KINDS)}")
    specs.append(SourceSpec(name=name, path=path, weight=weight, val_path=val_path, kind=kind,
                            text_field=str(s.get("text_field", "text"))))
  if not any(s.weight > 0 for s in specs):
    raise JaxlmError("every data.sources weight is 0: give at least one source a positive "
                     "weight (weight 0 means evaluated only)")
  if d.tokenizer not in tokenizers.KINDS and not tokenizers.is_tokenizer_path(d.tokenizer):
    raise JaxlmError(f"unknown data.tokenizer={d.tokenizer!r}: expected one of "
                     f"{', '.join(tokenizers.KINDS)} or the path of a tokenizer.json")
  rows = d.get("rows", "windows")
  if rows not in ROWS:
    raise JaxlmError(f"unknown data.rows={rows!r}: expected {' or '.join(ROWS)}")
  policy = d.get("on_bad_record", "fail")
  if policy not in sources_lib.BAD_RECORD_POLICIES:
    raise JaxlmError(f"unknown data.on_bad_record={policy!r}: expected fail or skip")
  if not 0.0 <= d.val_fraction < 1.0:
    raise JaxlmError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
  if d.val_fraction == 0 and any(not s.val_path for s in specs):
    name = next(s.name for s in specs if not s.val_path)
    raise JaxlmError(f"data.val_fraction=0 holds out no documents, and source {name!r} has no "
                     "val_path: give it one, or a val_fraction > 0")
  sample_mb = d.get("bpe_sample_mb", 64)
  if d.tokenizer == "bpe" and sample_mb <= 0:
    raise JaxlmError(f"data.bpe_sample_mb must be positive, got {sample_mb}")
  return DataSpec(sources=tuple(specs), tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                  bpe_sample_bytes=int(sample_mb * (1 << 20)), val_fraction=d.val_fraction,
                  rows=rows, on_bad_record=policy, store=d.get("store", ""),
                  cache_dir=d.cache_dir)


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The files of each source's train and val documents (val_paths; None = held out)."""
  train: tuple[sources_lib.Source | None, ...]  # None: an evaluation source with no path.
  val: tuple[sources_lib.Source | None, ...]


def resolve(spec: DataSpec) -> Resolved:
  """Expands every path (one-line errors for a pattern matching nothing, a missing extra)."""
  def one(s: SourceSpec, path: str, what: str) -> sources_lib.Source | None:
    if not path:
      return None
    return sources_lib.resolve(f"{s.name}{what}", path, kind=s.kind, text_field=s.text_field,
                               on_bad_record=spec.on_bad_record)
  return Resolved(train=tuple(one(s, s.path, "") for s in spec.sources),
                  val=tuple(one(s, s.val_path, " (val)") for s in spec.sources))


def tokenizer_key(spec: DataSpec) -> Any:
  """What decides the tokenizer: a tokenizer file is keyed by its bytes."""
  if tokenizers.is_tokenizer_path(spec.tokenizer):
    try:
      data = workdir_lib.path(spec.tokenizer).read_bytes()
    except OSError:
      raise JaxlmError(f"tokenizer file not found: data.tokenizer={spec.tokenizer!r}") from None
    return ["file", hashlib.sha256(data).hexdigest()]
  if spec.tokenizer == "bpe":
    return ["bpe", spec.vocab_size, spec.bpe_sample_bytes]
  return [spec.tokenizer]


def store_key(spec: DataSpec, resolved: Resolved) -> dict:
  """Everything the prepared tokens depend on; a store is reused only for an equal key."""
  def fp(src):
    return sources_lib.fingerprint(src) if src is not None else None
  return {"version": PREPARE_VERSION, "store_format": store.FORMAT_VERSION,
          "tokenizer": tokenizer_key(spec), "val_fraction": spec.val_fraction,
          "on_bad_record": spec.on_bad_record,
          "sources": [[s.name, fp(t), fp(v)] for s, t, v in
                      zip(spec.sources, resolved.train, resolved.val, strict=True)]}


def store_dir(spec: DataSpec, key: dict) -> str:
  """data.store, or a directory of the token cache named by a hash of `key`."""
  if spec.store:
    return spec.store if workdir_lib.is_remote(spec.store) else os.path.abspath(
        os.path.expanduser(spec.store))
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
  return os.path.join(spec.cache_dir or store.default_cache_dir(), f"store-{digest[:20]}")
