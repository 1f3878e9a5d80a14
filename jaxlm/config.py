"""A config's derived pieces, checked before any device or compilation: presets, ModelConfig.

Everything a command needs from an experiment config before it builds anything lives here, so
`params`, `bench`, `hf`, `sweep` and the training loop share one reading of it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
from absl import logging

from jaxlm import attention, mup, optim, sharding, tokenizers, wandb_sink
from jaxlm import data as data_lib
from jaxlm import model as model_lib
from jaxlm import workdir as workdir_lib
from jaxlm.corpus import batches as batches_lib
from jaxlm.corpus import spec as corpus_spec
from jaxlm.errors import JaxlmError
from jaxlm.tasks import scorer as scorer_lib
from jaxlm.tasks import task as task_lib

# What model.family fills in for each architecture key left at its "" / None / 0 default.
FAMILY_PRESETS = {
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", bias=True,
                 tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False,
                  tie_embeddings=False, rope_theta=10000.0, norm_eps=1e-5),
}
FAMILIES = tuple(FAMILY_PRESETS)
PRESET_KEYS = tuple(FAMILY_PRESETS["gpt2"])
# Model options of issue 19's recipes (defaults.py says what each is), off unless set; no
# family turns them on.
RECIPE_KEYS = ("qk_norm", "logit_softcap", "zero_init_proj", "attention_window")
# μP (issue 20, jaxlm/mup.py); saved configs without them read as sp.
MUP_KEYS = ("parametrization", "mup_base_width", "mup_base_head_dim")

# Generators of dropout masks (train.dropout_rng). threefry2x32 is JAX's default: the same bits
# on every backend and sharding. rbg draws the bits with XLA's RngBitGenerator (keys are still
# split and folded with threefry): cheaper masks, but the bits may differ across backends and
# XLA versions, so a run is reproducible on one platform only; unsafe_rbg also derives its keys
# with RngBitGenerator. hash keeps threefry keys but turns each into a mask with a counter hash
# that XLA fuses into the masked op (kernels.HashDropout): no mask is written to memory, and
# the bits are the same on every mesh. experiments/cpu_throughput/ compares their step times.
DROPOUT_RNGS = ("threefry2x32", "rbg", "unsafe_rbg", "hash")


def llama_ff_dim(d_model: int, multiple_of: int = 256) -> int:
  """LLaMA's MLP width: 2/3 of 4 * d_model (SwiGLU has three matrices, not two), rounded up."""
  hidden = int(2 * 4 * d_model / 3)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def resolved_architecture(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """model.norm/position/mlp/bias/... with the family preset filled in where left unset.

  Configs saved before these keys existed lack them; they read as unset, i.e. the preset.
  """
  if m.family not in FAMILIES:
    raise JaxlmError(f"unknown model.family={m.family!r}: expected one of {', '.join(FAMILIES)}")
  preset = FAMILY_PRESETS[m.family]
  out = {}
  for key in PRESET_KEYS:
    value = m[key] if key in m else None
    out[key] = preset[key] if value in (None, "", 0) and value is not False else value
  return out


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int, *,
                 log: bool = True) -> model_lib.ModelConfig:
  """The frozen ModelConfig of `cfg`, with the vocabulary of its tokenizer when 0."""
  m = cfg.model
  arch = resolved_architecture(m)
  if m.vocab_size and m.vocab_size < vocab_size:
    raise JaxlmError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({vocab_size}); set it to 0 to derive it")
  d_ff = m.d_ff or (llama_ff_dim(m.d_model) if m.family == "llama" else 0)
  # Configs saved before these options existed lack them: they read as off.
  recipe = {key: m[key] for key in RECIPE_KEYS + MUP_KEYS if key in m}
  # "auto" resolves for this machine's backend here, the one place a ModelConfig is made.
  # config.json keeps "auto": a run resumed or evaluated on another platform resolves it there
  # (the log line of the run says what each platform picked).
  dtype = attention.resolve_dtype(m.dtype) if m.dtype == "auto" else m.dtype
  mcfg = model_lib.ModelConfig(
      vocab_size=m.vocab_size or vocab_size, block_size=m.block_size, n_layer=m.n_layer,
      n_head=m.n_head, n_kv_head=m.n_kv_head, d_model=m.d_model, d_ff=d_ff,
      dropout=m.dropout, dtype=dtype, param_dtype=m.param_dtype, remat=m.remat,
      scan_layers=m.scan_layers, attention_block=m.attention_block,
      hash_dropout=cfg.train.dropout_rng == "hash", **arch, **recipe)
  impl = m.get("attention_impl", "auto")
  if impl == "einsum":
    return mcfg
  mixed = mcfg.scan_layers and mcfg.scan_window < 0
  impl = attention.resolve(impl, head_dim=mcfg.head_dim, dtype=dtype, block_size=m.block_size,
                           dropout=m.dropout, mixed_windows=mixed, log=log)
  if log and impl != "einsum" and mcfg.attention_block:
    logging.info("attention: model.attention_block=%d is a CPU tweak of the einsum path; "
                 "%s ignores it", mcfg.attention_block, impl)
  return dataclasses.replace(mcfg, attention_impl=impl)


def resolved_dict(cfg: ml_collections.ConfigDict, mcfg: model_lib.ModelConfig | None = None,
                  *, vocab_size: int = 0) -> dict[str, Any]:
  """`cfg` as the JSON of config.json: the vocabulary (mcfg's, else `vocab_size`) and family
  presets filled in."""
  resolved = cfg.to_dict()
  resolved["model"]["vocab_size"] = mcfg.vocab_size if mcfg else vocab_size
  resolved["model"].update(resolved_architecture(cfg.model))  # config.json says what ran.
  return resolved


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises JaxlmError naming the first impossible value; cheap, no data or devices touched."""
  mcfg = model_config(cfg, vocab_size=1, log=False)  # Shape checks, with a stand-in vocab.
  mup.check_optimizers(mcfg, cfg.optim)
  t = cfg.train
  for key in ("batch_size", "grad_accum", "log_every", "eval_steps", "steps_per_call"):
    if t[key] < 1:
      raise JaxlmError(f"train.{key} must be >= 1, got {t[key]}")
  if t.dropout_rng not in DROPOUT_RNGS:
    raise JaxlmError(f"unknown train.dropout_rng={t.dropout_rng!r}: expected one of "
                     f"{', '.join(DROPOUT_RNGS)}")
  for key in ("steps", "eval_every"):
    if t[key] < 0:
      raise JaxlmError(f"train.{key} must be >= 0, got {t[key]}")
  if t.log_params_every < 0 or (t.log_params_every and t.log_params_every % t.log_every):
    raise JaxlmError(f"train.log_params_every={t.log_params_every} must be 0 (off) or a "
                     f"multiple of train.log_every={t.log_every}: the stats leave the device "
                     "only on log steps")
  z_loss = t.get("z_loss", 0.0)
  if not (isinstance(z_loss, int | float) and math.isfinite(z_loss) and z_loss >= 0):
    raise JaxlmError(f"train.z_loss={z_loss} must be >= 0 (0 = off): it penalizes log Z^2")
  if cfg.sample.get("every", 0) < 0:
    raise JaxlmError(f"sample.every={cfg.sample.every} must be >= 0 (0 = only the last step's "
                     "sample)")
  if cfg.checkpoint.every < 0:
    raise JaxlmError(f"checkpoint.every={cfg.checkpoint.every} must be >= 0 (0 = only at the "
                     "end)")
  if cfg.checkpoint.keep < 1:
    raise JaxlmError(f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1: a run always keeps "
                     "its latest checkpoint, to resume from")
  # A warning, not an error: a short debug run with a long run's warmup is legitimate (the lr
  # just never reaches its peak), and refusing it would make every smoke override set warmup.
  if cfg.optim.warmup_steps > t.steps > 0:
    logging.warning("optim.warmup_steps=%d is more than train.steps=%d: the lr never reaches "
                    "optim.lr=%g", cfg.optim.warmup_steps, t.steps, cfg.optim.lr)
  if t.batch_size % t.grad_accum:
    raise JaxlmError(f"train.batch_size={t.batch_size} is not divisible by "
                     f"train.grad_accum={t.grad_accum}")
  if corpus_spec.uses_sources(cfg):
    corpus_spec.from_config(cfg)  # Sources, weights, rows: checked before anything is read.
  tok = cfg.data.tokenizer
  if tok not in tokenizers.KINDS and not tokenizers.is_tokenizer_path(tok):
    raise JaxlmError(f"unknown data.tokenizer={tok!r}: expected one of "
                     f"{', '.join(tokenizers.KINDS)} or the path of a tokenizer.json")
  # (With data.sources only `prepare` needs the file: a prepared store holds its tokenizer.)
  if (tokenizers.is_tokenizer_path(tok) and not corpus_spec.uses_sources(cfg)
      and not workdir_lib.path(tok).is_file()):
    raise JaxlmError(f"tokenizer file not found: data.tokenizer={tok!r}")
  if tok == "bpe" and cfg.data.vocab_size < tokenizers.MIN_BPE_VOCAB:
    raise JaxlmError(f"data.vocab_size={cfg.data.vocab_size} is too small for byte-level BPE: "
                     f"it needs at least {tokenizers.MIN_BPE_VOCAB} (256 bytes + merges)")
  if t.get("eval_tasks_truncation", "left") not in scorer_lib.TRUNCATIONS:
    raise JaxlmError(f"unknown train.eval_tasks_truncation={t.eval_tasks_truncation!r}: "
                     f"expected {' or '.join(scorer_lib.TRUNCATIONS)}")
  for name in task_lib.parse_list(t.get("eval_tasks", "")):
    task_lib.load(name)  # Unknown names, missing fields, labels out of range: one line each.
  # Names, ranges and the groups' keys; which tensors each group takes is checked against
  # the model's params in build.make_recipe (still before anything compiles).
  optim.check_config(cfg.optim)
  sharding.get_rules(cfg.mesh.rules)
  wandb_sink.check(cfg)  # A missing wandb is an error now, not after compiling.


def load_dataset(cfg: ml_collections.ConfigDict, *, log=logging.info, rebuild: bool = False,
                 tokenizer: tokenizers.Tokenizer | None = None
                 ) -> data_lib.Dataset | batches_lib.StoreData:
  """The corpus and tokenizer that `cfg.data` names, split, checked against the block size.

  With data.sources: the prepared token stores (prepared first when missing, with progress
  through `log`; they hold their tokenizer); else data.path tokenized in memory
  (jaxlm/data.py), with `tokenizer` (a run's own) when given.
  """
  if corpus_spec.uses_sources(cfg):
    return batches_lib.load(corpus_spec.from_config(cfg), cfg.model.block_size, log=log,
                            rebuild=rebuild)
  # Runs saved before data.vocab_size existed used no trained tokenizer.
  vocab_size = cfg.data.vocab_size if "vocab_size" in cfg.data else 0
  return data_lib.load_dataset(cfg.data.path, cfg.data.tokenizer,
                               val_fraction=cfg.data.val_fraction,
                               block_size=cfg.model.block_size, cache_dir=cfg.data.cache_dir,
                               vocab_size=vocab_size, saved=tokenizer)


def resolve_vocab_size(cfg: ml_collections.ConfigDict) -> tuple[int, str]:
  """(vocab size, where it came from); reads the corpus only when a tokenizer must see it."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size, "model.vocab_size"
  if cfg.data.tokenizer == "byte" and not corpus_spec.uses_sources(cfg):
    return tokenizers.ByteTokenizer().vocab_size, "byte tokenizer"
  dataset = load_dataset(cfg)
  return dataset.tokenizer.vocab_size, f"{cfg.data.tokenizer} tokenizer on {dataset.source}"
