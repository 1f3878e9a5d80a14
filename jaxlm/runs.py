"""A finished run, loaded from its workdir: one way, for eval, sample, params, hf and init_from."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import evaluate, sharding, tokenizers
from jaxlm import model as model_lib
from jaxlm import resume as resume_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError
from jaxlm.tasks import suite as suite_lib
from jaxlm.tasks import task as task_lib

PyTree = Any
SECTIONS = ("model", "train", "data", "optim")  # What every run's config.json has.


@dataclasses.dataclass(frozen=True)
class Run:
  """A run restored from its workdir."""
  cfg: ml_collections.ConfigDict  # config.json, as resolved when it was trained or imported.
  tokenizer: tokenizers.Tokenizer | None  # None for an imported model without tokenizer.json.
  mcfg: model_lib.ModelConfig
  model: model_lib.DecoderLM
  params: PyTree
  step: int


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's config.json; one line naming what is missing when it is not a run.

  A config.json that is missing or damaged (not JSON, not a config) is read from the latest
  checkpoint's meta, which holds the same resolved config, with a warning; without one, one
  line names the file and what to do.
  """
  root = workdir_lib.path(workdir)
  if not root.is_dir():
    raise JaxlmError(f"no run in {workdir!r}: the directory does not exist")
  path = root / "config.json"
  if not path.exists() and not (root / "checkpoints").is_dir():
    raise JaxlmError(f"no run in {workdir!r}: it has no config.json")
  saved = resume_lib.read_json(path)
  if saved is not None and all(isinstance(saved.get(k), dict) for k in SECTIONS):
    return ml_collections.ConfigDict(saved)
  why = "is damaged" if path.exists() else "is missing"
  meta = latest_meta(workdir)
  if isinstance(meta.get("config"), dict):
    logging.warning("%s %s; using the config saved with checkpoint %s", path, why, meta["step"])
    return ml_collections.ConfigDict(meta["config"])
  raise JaxlmError(f"{path} {why} and no checkpoint holds a copy of the config: restore it "
                   "(a run's config.json is its resolved config, as JSON)")


def latest_meta(workdir: str) -> dict[str, Any]:
  """The latest checkpoint's meta (config, tokenizer, step), or {} when there is none."""
  ckpt_dir = workdir_lib.path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return {}
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)
  try:
    latest = ckpt.latest_step()
    return {} if latest is None else {**ckpt.meta(latest), "step": latest}
  finally:
    ckpt.close()


def read_tokenizer(workdir: str, required: bool) -> tokenizers.Tokenizer | None:
  """tokenizer.json, else (damaged or missing) the latest checkpoint's copy, with a warning."""
  path = workdir_lib.path(workdir) / "tokenizer.json"
  try:
    return tokenizers.load(path) if required or path.exists() else None
  except JaxlmError as e:
    saved = latest_meta(workdir).get("tokenizer")
    if not isinstance(saved, dict):
      raise
    logging.warning("%s; using the tokenizer saved with the latest checkpoint", e)
    return tokenizers.from_json(saved)


def abstract_params(model: model_lib.DecoderLM, mesh: jax.sharding.Mesh,
                    rules: sharding.Rules) -> PyTree:
  """Shape/dtype/sharding of the model's params, without allocating them."""
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  return sharding.with_shardings(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules))


def restore_params(workdir: str, target: PyTree,
                   step: int | str | None = None) -> tuple[PyTree, int]:
  """(params, step) of the checkpoint `step` (latest, a number or 'best'), into `target`."""
  ckpt_dir = workdir_lib.path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise JaxlmError(f"no checkpoint in {workdir!r} (looked for {ckpt_dir}); train it first "
                     "(jaxlm train)")
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)
  try:
    # An explicit step that is damaged is an error naming the good ones; latest and best fall
    # back to the newest good step, with a warning naming the damaged one.
    restored, resolved = ckpt.restore_good(step, {"params": target})
    return restored["params"], resolved
  finally:
    ckpt.close()


def load_run(workdir: str, step: int | str | None = None, *,
             need_tokenizer: bool = True) -> Run:
  """Restores a run's params (latest, `step`, or 'best') onto this host's devices.

  `need_tokenizer=False` accepts a workdir without tokenizer.json (an imported model, which
  `jaxlm convert --to_hf` can still export).
  """
  cfg = read_config(workdir)
  tok = read_tokenizer(workdir, need_tokenizer)
  if tok is None and not cfg.model.vocab_size:
    raise JaxlmError(f"{workdir_lib.path(workdir) / 'config.json'} has no model.vocab_size "
                     "and the run has no tokenizer.json")
  mcfg = config_lib.model_config(cfg, tok.vocab_size if tok else cfg.model.vocab_size)
  model = model_lib.make_model(mcfg)
  # Whatever mesh trained it, restore onto the devices here (data parallel: replicated).
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  target = abstract_params(model, mesh, sharding.get_rules(cfg.mesh.rules))
  params, resolved = restore_params(workdir, target, step)
  return Run(cfg=cfg, tokenizer=tok, mcfg=mcfg, model=model, params=params, step=resolved)


def evaluate_run(workdir: str, step: int | str | None = None, eval_steps: int | None = None,
                 tasks: list[str] | None = None, val: bool = True,
                 truncation: str = "") -> dict[str, Any]:
  """Validation loss, perplexity and bits per token (and per byte) of a saved checkpoint, and
  the metrics of `tasks` (names or task files) under it; written to eval/<step>.json."""
  if eval_steps is not None and eval_steps < 1:
    raise JaxlmError(f"--eval_steps must be >= 1, got {eval_steps}")
  if not val and not tasks:
    raise JaxlmError("nothing to evaluate: --noval and no --tasks")
  for name in tasks or ():
    task_lib.load(name)  # Before the checkpoint is read: a bad task is one line, at once.
  run = load_run(workdir, step)
  out: dict[str, Any] = {"step": run.step}
  if val:
    out.update(_validation(run, eval_steps))
  if tasks:
    if run.tokenizer is None:
      raise JaxlmError(f"the run in {workdir} has no tokenizer.json: tasks need one")
    suite = suite_lib.Suite(tasks, run.model, run.tokenizer, truncation=truncation or
                            run.cfg.train.get("eval_tasks_truncation", "left"))
    out["tasks"] = suite.evaluate(run.params)
    out.update(suite_lib.flatten(out["tasks"]))
  workdir_lib.write_text(workdir_lib.path(workdir) / "eval" / f"{run.step}.json",
                         json.dumps(out, indent=2, sort_keys=True))
  return out


def _validation(run: Run, eval_steps: int | None) -> dict[str, Any]:
  cfg = run.cfg
  # The run's own tokenizer: one derived again from a corpus edited since would shift its ids.
  dataset = config_lib.load_dataset(cfg, tokenizer=run.tokenizer)
  n = eval_steps or cfg.train.eval_steps
  eval_fn = jax.jit(functools.partial(evaluate.eval_steps, model=run.model))
  table = dataset.tokenizer.token_bytes() if run.tokenizer else None
  out: dict[str, Any] = {"tokens": n * cfg.train.batch_size * cfg.model.block_size}
  # The same fixed batches as the evaluations during training, so the numbers compare.
  for name, fn in dataset.eval_sets().items():
    if not name.startswith("val"):
      continue
    batches = evaluate.stack(fn(seed=cfg.seed, step=i, batch_size=cfg.train.batch_size,
                                block_size=cfg.model.block_size) for i in range(n))
    n_bytes = int(table[batches["targets"]].sum()) if table is not None else None
    result = evaluate.evaluate(eval_fn, run.params, batches, n_bytes)
    out.update({f"{name}/{k}": v for k, v in result.items()})
  for alias, name in dataset.aliases().items():
    out.update({f"{alias}/{k}": out[f"{name}/{k}"] for k in ("loss", "bpb") if
                f"{name}/{k}" in out})
  return out
