"""Adaptive search (Optuna TPE + median pruning) of lr, warmup and weight decay, default experiment.

  jaxlm sweep --config configs/sweeps/shakespeare_search.py --workdir runs/search --parallel 2

Expected (an estimate: this search has not been run in full yet): 16 trials of ~1.5 minutes on a
2-core CPU, fewer with pruning; the best should match the lr sweep's best (val loss ~1.85).
Needs the optional extra: pip install 'jaxlm[sweep]'. On several machines, share one study: run
  jaxlm sweep --config configs/sweeps/shakespeare_search.py --workdir runs/search --worker \
      --storage postgresql://user@host/db
on each, then `jaxlm sweep --summarize --workdir runs/search` where the trial directories are.
"""

from jaxlm import sweep

N_TRIALS = 16
SAMPLER = "tpe"  # tpe | random
PRUNER = "median"  # median | none: stop a trial whose val loss is worse than the median so far.


def get_config():
  return sweep.load_experiment("../shakespeare_char.py", relative_to=__file__)


def get_search_space():
  return {
      "optim.lr": sweep.log_uniform(1e-4, 1e-2),
      "optim.warmup_steps": sweep.choice(0, 100, 300),
      "optim.weight_decay": sweep.uniform(0.0, 0.2),
  }
