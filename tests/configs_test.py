"""Every config in configs/ loads, validates, and builds abstract params without allocating them."""

import glob
import os

import jax
import pytest
from conftest import CONFIGS, load_config

from jaxlm import config as config_lib
from jaxlm import model as model_lib

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "*.py")))


def test_there_are_configs():
  assert {"shakespeare_char", "shakespeare_char_large", "smoke"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_and_builds_abstract_params(name):
  cfg = load_config(name)
  config_lib.validate_config(cfg)
  mcfg = config_lib.model_config(cfg, vocab_size=65)
  model = model_lib.make_model(mcfg)
  abstract = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  n = sum(x.value.size for x in jax.tree.leaves(
      abstract, is_leaf=lambda x: hasattr(x, "names")))
  assert n > 0


@pytest.mark.parametrize("name", NAMES)
def test_config_docstring_gives_the_command(name):
  with open(os.path.join(CONFIGS, f"{name}.py")) as f:
    source = f.read()
  assert f"jaxlm train --config configs/{name}.py" in source
  assert "Expected" in source


def test_default_experiment_is_the_nanogpt_cpu_recipe():
  c = load_config("shakespeare_char")
  assert (c.model.n_layer, c.model.n_head, c.model.d_model, c.model.block_size) == (4, 4, 128, 64)
  assert (c.train.batch_size, c.train.steps, c.optim.lr, c.optim.min_lr) == (12, 2000, 1e-3, 1e-4)
  assert (c.optim.warmup_steps, c.optim.b2, c.model.dropout) == (100, 0.99, 0.0)
  assert (c.optim.weight_decay, c.optim.grad_clip) == (0.1, 1.0)
  assert not c.model.tie_embeddings


SWEEPS = sorted(os.path.basename(p)[:-3]
                for p in glob.glob(os.path.join(CONFIGS, "sweeps", "*.py")))


def test_there_are_sweeps():
  assert {"shakespeare_lr", "shakespeare_search"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_loads_and_every_trial_is_valid(name):
  from jaxlm import sweep
  path = os.path.join(CONFIGS, "sweeps", f"{name}.py")
  with open(path) as f:
    source = f.read()
  assert f"jaxlm sweep --config configs/sweeps/{name}.py" in source and "Expected" in source
  cfg = sweep.load_module(path).get_config()
  cfg.lock()
  config_lib.validate_config(cfg)
  plan = sweep.prepare(path, cfg, {})
  if plan.trials is not None:
    assert plan.trials and all(spec.error is None for spec in plan.trials)
  else:
    assert plan.space and plan.n_trials >= 1


def test_lr_sweep_is_the_default_experiment_with_lr_varied():
  from jaxlm import sweep
  path = os.path.join(CONFIGS, "sweeps", "shakespeare_lr.py")
  base = load_config("shakespeare_char").to_dict()
  assert sweep.load_module(path).get_config().to_dict() == base
  trials = sweep.load_module(path).get_sweep()
  assert [t["optim.lr"] for t in trials] == [3e-4, 1e-3, 3e-3, 1e-2]
  cfg = sweep.load_module(path).get_config()
  assert sweep.resolve(cfg, {"optim.lr": 3e-3}).optim.min_lr == pytest.approx(3e-4)
