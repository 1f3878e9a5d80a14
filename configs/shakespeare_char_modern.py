"""The default experiment (configs/shakespeare_char.py) with a 2025 recipe: Muon + WSD.

  jaxlm train --config configs/shakespeare_char_modern.py --workdir runs/scm

The same model, data, batch and 2000 steps; only the optimizer and its schedule differ: Muon
(Newton-Schulz-orthogonalized momentum) on the 20 matrices of the blocks and AdamW on the
embeddings, head, norms and biases, a warmup-stable-decay schedule, and a 3x higher peak lr.
Why these and not the architecture options (qk_norm, logit soft-cap, relu2, zero-initialized
projections): experiments/recipes/README.md, which trains each combination side by side.

Expected on a 2-core CPU: val loss 1.619 after 2000 steps (the default ends at 1.875, and at
1.78 with its own best lr), about 140 s wall: Muon's step is about 1.5x AdamW's at this size.
"""

from jaxlm import sweep


def get_config():
  # The default experiment as it is (model, data, batch, steps, evals); only optim changes.
  c = sweep.load_experiment("shakespeare_char.py", relative_to=__file__)

  # Muon on the hidden matrices, AdamW on the rest, both at optim.lr: optax's muon scales its
  # updates to AdamW's RMS (optim.muon_rms), so one lr serves both parts.
  c.optim.name = "muon"
  # Warmup, then optim.lr until the last 20% of the steps, then down to min_lr along
  # 1 - sqrt(progress) (optim.decay_fraction and optim.decay_shape keep their defaults).
  c.optim.schedule = "wsd"
  # 3e-3 beats 1e-3 for AdamW too at 2000 steps (experiments/lr_sweep/); Muon takes it as well.
  c.optim.lr = 3e-3
  c.optim.min_lr = 3e-4  # lr / 10, as the default.
  return c
