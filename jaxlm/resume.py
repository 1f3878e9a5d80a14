"""Resuming a run: which config changes a resume accepts, the run's own tokenizer, the history.

A workdir with a checkpoint holds a run, and the latest checkpoint's meta (its config and
tokenizer) says what produced the saved state. A resume compares the new config with that one
key by key, through `POLICY`:

- refuse: a change that breaks exactness or the meaning of the saved state (the seed, the batch
  size, the data and tokenizer, the model, the optimizer and its groups, the moments' betas);
- warn: a change a user may make deliberately but that changes what the run computes from here
  on (the lr and its schedule, train.steps, which the schedule decays to, clipping, decay, the
  evaluation batches); accepted, with a warning per key;
- allow: how the run is driven (logging, evaluation and checkpoint periods, stop_at, the mesh,
  samples, W&B); accepted, with an info line per key.

Every accepted change is appended to the workdir's config_history.jsonl (step, time, key, old,
new), after a "start" record with the config the run began with, so that what ran is never
lost when config.json is rewritten (`jaxlm params --workdir` takes the run's seed from there).

The tokenizer is part of the run: a resume encodes the corpus with the saved one and refuses a
corpus it cannot encode, instead of deriving a new vocabulary from an edited corpus.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import hashlib
import json
from typing import Any

import ml_collections
from absl import logging

from jaxlm import attention, defaults, tokenizers
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import workdir as workdir_lib
from jaxlm.corpus import batches as batches_lib
from jaxlm.corpus import spec as corpus_spec
from jaxlm.errors import JaxlmError

HISTORY = "config_history.jsonl"
REFUSE, WARN, ALLOW = "refuse", "warn", "allow"

# (pattern over dotted keys, policy, why): the first pattern that matches a key decides. A key
# no pattern matches is refused (tests/reliability_resume_test.py checks every key of the base
# config has a pattern, so a new key gets a deliberate decision).
POLICY: tuple[tuple[str, str, str], ...] = (
    ("seed", REFUSE, "it seeds the init, the data order and dropout"),
    ("data.cache_dir", ALLOW, "where derived tokens are cached"),
    ("data.*", REFUSE, "the saved state was trained on that data and tokenizer"),
    # The same math either way (defaults.py): a resume may trade memory or speed.
    ("model.remat", ALLOW, "recomputation only"),
    ("model.attention_block", ALLOW, "the same attention in blocks"),
    ("model.attention_impl", ALLOW, "the same attention through another kernel"),
    ("model.*", REFUSE, "the saved params are that model's"),
    ("optim.name", REFUSE, "the saved optimizer state is that optimizer's"),
    ("optim.groups.*.lr_mult", WARN, "it scales the group's lr from here on"),
    ("optim.groups.*.weight_decay", WARN, "it changes the group's decay from here on"),
    ("optim.groups*", REFUSE, "the saved optimizer state is split by those groups"),
    ("optim.b1", REFUSE, "the saved moments are averages with it"),
    ("optim.b2", REFUSE, "the saved moments are averages with it"),
    ("optim.muon_beta", REFUSE, "the saved momentum is an average with it"),
    ("optim.*", WARN, "it changes the updates from here on"),
    ("train.batch_size", REFUSE, "every step's batch, the data order, depends on it"),
    ("train.dropout_rng", REFUSE, "it draws the dropout masks"),
    ("train.steps", WARN, "the lr schedule decays to train.steps, so it changes from here on"),
    ("train.z_loss", WARN, "it changes the loss from here on"),
    ("train.eval_steps", WARN, "evaluations before and after it use other batches, so their "
     "losses (and the best checkpoint) compare different sets"),
    ("train.*", ALLOW, ""),
    ("checkpoint.*", ALLOW, ""),
    ("metrics.*", ALLOW, ""),
    ("mesh.*", ALLOW, "a checkpoint restores onto any mesh"),
    ("distributed.*", ALLOW, ""),
    ("sample.*", ALLOW, ""),
    ("xla_flags", ALLOW, ""),
    ("compile_cache", ALLOW, ""),
    ("host_allocator", ALLOW, ""),
)


def policy(key: str) -> tuple[str, str]:
  """(policy, why) of a dotted config key."""
  for pattern, verdict, why in POLICY:
    if fnmatch.fnmatchcase(key, pattern):
      return verdict, why
  return REFUSE, "jaxlm does not know whether a resume may change it"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf}; an empty dict is a leaf (no groups, no sources)."""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@dataclasses.dataclass(frozen=True)
class Change:
  key: str
  old: Any
  new: Any
  policy: str
  why: str


@dataclasses.dataclass(frozen=True)
class Prior:
  """What a workdir holds of a run before it resumes: nothing for a fresh run (latest None)."""
  workdir: str
  ckpt: checkpoint_lib.Checkpointer
  latest: int | None
  config: dict[str, Any] | None  # The resolved config the latest checkpoint was saved with.
  tokenizer: tokenizers.Tokenizer | None
  meta: dict[str, Any]
  changes: tuple[Change, ...] = ()  # What the new config changes, accepted (check_config).


def open_run(workdir: str, cfg: ml_collections.ConfigDict) -> Prior:
  """The checkpoints of `workdir` and, when one exists, the config and tokenizer saved with the
  latest, and the changes `cfg` makes to it (logged); refuses a workdir it cannot resume
  (imported params without optimizer state) or a change a resume cannot make."""
  root = workdir_lib.path(workdir)
  ckpt = checkpoint_lib.Checkpointer(root / "checkpoints", keep=cfg.checkpoint.keep)
  latest, meta = ckpt.latest_step(), None
  while latest is not None:
    try:
      meta = ckpt.meta(latest)
      break
    except checkpoint_lib.DamagedCheckpoint as e:  # The restore falls back past it too.
      logging.warning("%s; checking the resume against the step before it", e)
      older = [s for s in ckpt.all_steps() if s < latest]
      latest = older[-1] if older else None
  if latest is None:
    return Prior(workdir, ckpt, None, None, None, {})
  if meta.get("params_only"):
    raise JaxlmError(f"workdir {workdir} holds imported params without optimizer state (step "
                     f"{latest}); train from them in a new workdir with "
                     f"--config.train.init_from={workdir}")
  config = meta.get("config")
  if not isinstance(config, dict):  # No jaxlm checkpoint lacks it; config.json is the fallback.
    config = read_json(root / "config.json")
  tok_json = meta.get("tokenizer")
  if isinstance(tok_json, dict):
    tok = tokenizers.from_json(tok_json)
  else:
    tok = tokenizers.load(root / "tokenizer.json") if (root / "tokenizer.json").exists() else None
  prior = Prior(workdir, ckpt, latest, config, tok, meta)
  return dataclasses.replace(prior, changes=tuple(check_config(cfg, prior)))


def read_json(path: Any) -> dict[str, Any] | None:
  """A JSON object file, or None when it is missing or damaged (not JSON, not an object)."""
  try:
    d = json.loads(workdir_lib.read_text(path))
  except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    return None
  return d if isinstance(d, dict) else None


def resolved_config(cfg: ml_collections.ConfigDict, prior: Prior) -> dict[str, Any]:
  """`cfg` as config.json would hold it, its vocabulary the saved tokenizer's (it will be)."""
  vocab = cfg.model.vocab_size or (prior.tokenizer.vocab_size if prior.tokenizer else 0)
  return json.loads(json.dumps(config_lib.resolved_dict(cfg, vocab_size=vocab)))


def changes(saved: dict[str, Any], new: dict[str, Any]) -> list[Change]:
  """Every key whose value differs; a key a config saved by an older jaxlm lacks reads as its
  default (as config.py reads such configs), one of a group or source as absent (None)."""
  base = flatten(defaults.base_config().to_dict())
  old_flat, new_flat = flatten(saved), flatten(new)
  out = []
  for key in sorted(set(old_flat) | set(new_flat)):
    old = old_flat.get(key, base.get(key))
    value = new_flat.get(key, base.get(key))
    if key == "model.vocab_size" and not value:
      continue
    if key == "model.dtype":  # "auto" is the dtype this platform resolves it to.
      old, value = attention.resolve_dtype(old), attention.resolve_dtype(value)
    if old != value:
      out.append(Change(key, old, value, *policy(key)))
  return out


def check_config(cfg: ml_collections.ConfigDict, prior: Prior) -> list[Change]:
  """The accepted changes of `cfg` against the saved run, logged one line each; refuses (one
  line) the first change that breaks the saved state, before any data is read."""
  if prior.latest is None or prior.config is None:
    return []
  found = [_moved_corpus(c, prior) for c in changes(prior.config, resolved_config(cfg, prior))]
  refused = [c for c in found if c.policy == REFUSE]
  if refused:
    c = refused[0]
    others = f" (and {', '.join(r.key for r in refused[1:])})" if refused[1:] else ""
    raise JaxlmError(f"workdir {prior.workdir} holds a run with {c.key}={c.old!r} but the "
                     f"config says {c.new!r}{others}: a resume cannot change it ({c.why}); "
                     f"{hint(cfg, prior, refused)}")
  for c in found:
    log = logging.warning if c.policy == WARN else logging.info
    log("resume at step %d changes %s: %r -> %r%s", prior.latest, c.key, c.old, c.new,
        f" ({c.why})" if c.why else "")
  return found


def _moved_corpus(c: Change, prior: Prior) -> Change:
  """A data.path that names the same corpus (by its sha256) as the saved run's: allowed."""
  saved = prior.meta.get("data_sha256")
  if c.key != "data.path" or not saved or not isinstance(c.new, str):
    return c
  try:
    raw, _ = data_lib.read_corpus(c.new)
  except JaxlmError:
    return c  # No corpus there: refused as another path.
  if hashlib.sha256(raw).hexdigest() != saved:
    return c
  return dataclasses.replace(c, policy=ALLOW, why="the same corpus (sha256) at another path")


def hint(cfg: ml_collections.ConfigDict, prior: Prior, refused: list[Change]) -> str:
  """What to do instead. train.init_from (a new run from this one's params) is offered only for
  what it can serve: it loads the params into the new model, so the shapes must match, and it
  reads token ids with the new tokenizer; another seed would start from this run's init."""
  keys = {c.key for c in refused}
  if "seed" in keys:
    return "train another seed in a new workdir"
  if not _same_param_shapes(cfg, prior):
    return ("train it in a new workdir (this run's weights do not fit that model, so "
            "train.init_from cannot start it)")
  if any(k.startswith("data.") for k in keys):
    return (f"train on it in a new workdir (with --config.train.init_from={prior.workdir} only "
            "if the tokenizer stays the same: its weights read token ids)")
  return (f"use a new workdir, with --config.train.init_from={prior.workdir} to start from its "
          "weights")


def _same_param_shapes(cfg: ml_collections.ConfigDict, prior: Prior) -> bool:
  """The new model's params have the saved checkpoint's names and shapes (no allocation)."""
  import flax.linen as nn
  import jax

  from jaxlm import model as model_lib
  try:
    vocab = prior.tokenizer.vocab_size if prior.tokenizer else cfg.model.vocab_size
    model = model_lib.make_model(config_lib.model_config(cfg, vocab))
    boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
    target = nn.unbox(boxed)
    prior.ckpt._check_shapes(prior.latest, "params", target)
  except (JaxlmError, KeyError, ValueError):  # No shapes to compare counts as no match.
    return False
  return True


def load_dataset(cfg: ml_collections.ConfigDict,
                 prior: Prior) -> data_lib.Dataset | batches_lib.StoreData:
  """The corpus of `cfg`, encoded with the run's saved tokenizer when it resumes."""
  if prior.tokenizer is None:
    return config_lib.load_dataset(cfg)
  where = f"{prior.workdir}/tokenizer.json"
  if corpus_spec.uses_sources(cfg):
    dataset = config_lib.load_dataset(cfg)
    if dataset.tokenizer.to_json() != prior.tokenizer.to_json():
      raise JaxlmError(f"the token store's tokenizer ({dataset.tokenizer.kind}, vocab "
                       f"{dataset.tokenizer.vocab_size}) is not the run's ({where}, vocab "
                       f"{prior.tokenizer.vocab_size}): the sources changed since the run "
                       "started; restore them, or train on them in a new workdir")
    return dataset
  try:
    dataset = config_lib.load_dataset(cfg, tokenizer=prior.tokenizer)
  except tokenizers.UnknownCharacters as e:
    raise JaxlmError(f"the corpus (data.path={cfg.data.path!r}) has {len(e.chars)} character(s) "
                     f"the run's tokenizer ({where}) does not know: {e.chars!r}; it changed "
                     "since the run started: restore it, or train on it in a new workdir "
                     "(a resume keeps the run's token ids)") from None
  saved = prior.meta.get("data_sha256")
  if saved and saved != dataset.sha256:
    logging.warning("the corpus (data.path=%r) changed since step %d (sha256 %s..., now "
                    "%s...): the batches from here on come from the new text, encoded with the "
                    "run's tokenizer", cfg.data.path, prior.latest, saved[:12],
                    dataset.sha256[:12])
  return dataset


def checkpoint_meta(resolved: dict[str, Any], dataset: Any) -> dict[str, Any]:
  """What every checkpoint says of itself besides its step: the config and tokenizer a resume
  is checked against, and the corpus' hash (data.path), to tell when it was edited."""
  return {"config": resolved, "tokenizer": dataset.tokenizer.to_json(),
          "data_sha256": getattr(dataset, "sha256", None)}


def write_run(root: Any, tokenizer: tokenizers.Tokenizer, resolved: dict[str, Any],
              prior: Prior) -> None:
  """tokenizer.json, config.json (both rewritten whole: a damaged one is repaired from the
  checkpoint's) and the history: the first writes of a run, once it is known to proceed."""
  tokenizers.save(tokenizer, root / "tokenizer.json")
  workdir_lib.write_text(root / "config.json", json.dumps(resolved, indent=2, sort_keys=True))
  record(root, resolved, list(prior.changes), prior.latest)


def record(root: Any, resolved: dict[str, Any], found: list[Change], latest: int | None) -> None:
  """Appends the run's start (a fresh run) or its accepted changes to config_history.jsonl."""
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  if latest is None:
    lines = [{"event": "start", "step": 0, "time": now, "seed": resolved.get("seed"),
              "config": resolved}]
  else:
    lines = [{"event": "change", "step": latest, "time": now, "key": c.key, "old": c.old,
              "new": c.new, "policy": c.policy} for c in found]
  if lines:
    workdir_lib.append_text(root / HISTORY, "".join(json.dumps(x, sort_keys=True) + "\n"
                                                    for x in lines))


def history(workdir: str) -> list[dict[str, Any]]:
  """config_history.jsonl's complete records ([] for a run from before it existed)."""
  p = workdir_lib.path(workdir) / HISTORY
  if not p.exists():
    return []
  out = []
  for line in workdir_lib.read_text(p).splitlines():
    try:
      rec = json.loads(line)
    except ValueError:  # A line cut short by a crash: the others still count.
      continue
    if isinstance(rec, dict):
      out.append(rec)
  return out


def original_seed(workdir: str, fallback: int) -> int:
  """The seed the run in `workdir` began with (its last start record), else `fallback`."""
  starts = [r for r in history(workdir) if r.get("event") == "start"
            and isinstance(r.get("seed"), int)]
  return starts[-1]["seed"] if starts else fallback
