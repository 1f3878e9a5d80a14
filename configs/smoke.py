"""Tiny smoke test: a 2-layer, 32-wide char model for a few steps; used by the tests.

  jaxlm train --config configs/smoke.py --workdir /tmp/smoke

Expected: finishes in a few seconds on a CPU; val loss falls from ~4.2 (ln 65) to ~3.
"""

from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.model.n_layer = 2
  c.model.n_head = 4
  c.model.d_model = 32
  c.model.block_size = 16
  c.optim.lr = 3e-3
  c.optim.min_lr = 3e-4
  c.optim.warmup_steps = 5
  c.train.steps = 30
  c.train.batch_size = 8
  c.train.eval_every = 15
  c.train.eval_steps = 2
  c.train.log_every = 5
  c.checkpoint.every = 10
  c.sample.max_new_tokens = 32
  return c
