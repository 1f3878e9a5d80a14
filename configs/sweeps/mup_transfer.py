"""μP learning-rate transfer (issue 20): optim.lr at four widths, under sp and under mup.

  jaxlm sweep --config configs/sweeps/mup_transfer.py --workdir runs/mup_transfer --parallel 2
  python experiments/mup_transfer/plot.py runs/mup_transfer/results.csv experiments/mup_transfer

40 trials of a 2-layer character model on the shipped tiny-shakespeare: d_model 32, 64, 128
and 256 (4 heads; the base width of mup is 32, where mup and sp are the same model), five
learning rates half a decade apart, 150 steps of 8 x 32 tokens each.

Expected (measured, experiments/mup_transfer/README.md, with the figure): the best lr is 3e-3
at every width under mup; under sp it moves from 3e-3 to 1e-3 at d_model 256. The two are the
same at d_model 32. About 40 minutes on a busy 2-core CPU.
"""

from jaxlm import defaults, sweep

WIDTHS = [32, 64, 128, 256]
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def get_config():
  c = defaults.base_config()
  c.data.tokenizer = "char"
  c.model.n_layer = 2
  c.model.n_head = 4
  c.model.d_model = 32
  c.model.block_size = 32
  c.model.mup_base_width = 32  # Read only by the mup trials; sp ignores it.
  c.optim.lr = 1e-2
  c.optim.min_lr = c.optim.get_ref("lr") / 10  # The cosine ends at lr / 10 in every trial.
  c.optim.warmup_steps = 20
  c.optim.b2 = 0.99
  c.train.steps = 150
  c.train.batch_size = 8
  c.train.eval_every = 150  # Only the final evaluation: it is what the sweep compares.
  c.train.eval_steps = 10
  c.train.log_every = 50
  c.train.steps_per_call = 10
  c.checkpoint.every = 0
  c.sample.max_new_tokens = 16
  return c


def get_sweep():
  return sweep.product({"model.parametrization": ["sp", "mup"], "model.d_model": WIDTHS,
                        "optim.lr": LRS})
