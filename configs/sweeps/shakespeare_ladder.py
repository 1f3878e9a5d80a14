"""A scaling ladder of the default experiment: 5 sizes from ~20k to ~1M parameters, 1000 steps each.

  jaxlm sweep --config configs/sweeps/shakespeare_ladder.py --workdir runs/ladder --parallel 2

Every size trains on the same 768k tokens (1000 steps of 12 x 64) with the same recipe
(configs/shakespeare_char.py at lr 3e-3, experiments/lr_sweep's best); only the shape changes.
The summary (runs/ladder/results.md, scaling.json, scaling_loss_vs_n.png) fits
L(N) = E + A / N^alpha, with and without embeddings. Measured: experiments/scaling_ladder/.

Expected: val losses from ~2.23 (xs, 19k params) to ~1.94 (xl, 1.03M); the pure power law's
alpha ~0.035 (E free sits at its bound 0 on these points).
"""

from jaxlm import sweep


def get_config():
  c = sweep.load_experiment("../shakespeare_char.py", relative_to=__file__)
  c.optim.lr = 3e-3
  c.optim.min_lr = c.optim.get_ref("lr") / 10
  c.train.steps = 1000
  c.train.eval_every = 500
  c.train.eval_steps = 20
  c.train.log_params_every = 0  # Per-layer statistics are not what a ladder measures.
  c.checkpoint.every = 1000
  return c


def get_ladder():
  # Depth and width grow together (d_model / n_layer from 21 to 36): Kaplan et al. find the
  # shape matters little once N is fixed, as long as it is not extreme.
  return sweep.ladder({
      "xs": {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2},
      "s": {"model.n_layer": 2, "model.d_model": 48, "model.n_head": 4},
      "m": {"model.n_layer": 3, "model.d_model": 64, "model.n_head": 4},
      "l": {"model.n_layer": 4, "model.d_model": 96, "model.n_head": 4},
      "xl": {"model.n_layer": 4, "model.d_model": 144, "model.n_head": 4},
  })
