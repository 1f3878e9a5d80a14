"""Learning-rate sweep over the default experiment (configs/shakespeare_char.py), 4 trials.

  jaxlm sweep --config configs/sweeps/shakespeare_lr.py --workdir runs/lr --parallel 2

Expected (measured, experiments/lr_sweep/README.md): final val loss 2.09 / 1.90 / 1.76 / 1.76
for lr 3e-4 / 1e-3 (the default) / 3e-3 / 1e-2. At 2000 steps the higher rates win. About 6
minutes on an idle 2-core CPU (14 on a busy one). Writes runs/lr/results.md, .csv and PNG plots.
"""

from jaxlm import sweep


def get_config():
  # The experiment itself, unchanged: each trial differs from it only by its overrides.
  c = sweep.load_experiment("../shakespeare_char.py", relative_to=__file__)
  # The cosine schedule decays to lr / 10 in every trial, as in the experiment (a reference:
  # it follows any override of optim.lr).
  c.optim.min_lr = c.optim.get_ref("lr") / 10
  return c


def get_sweep():
  # Half-decade steps around the default 1e-3.
  return sweep.axis("optim.lr", [3e-4, 1e-3, 3e-3, 1e-2])
