"""Character-level GPT on tiny-shakespeare: nanoGPT's GPU recipe (6 x 384, block 256, dropout 0.2).

  jaxlm train --config configs/shakespeare_char_large.py --workdir runs/sc_large

Expected: val loss ~1.47 after 5000 steps (nanoGPT reports 1.4697 on an A100, ~3 minutes);
10.7M parameters. On a 2-core CPU a step takes seconds: use a GPU or TPU, or fewer steps.
"""

from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.data.tokenizer = "char"

  c.model.n_layer = 6
  c.model.n_head = 6
  c.model.d_model = 384
  c.model.block_size = 256  # Context of up to 256 previous characters.
  c.model.dropout = 0.2  # This model overfits tiny-shakespeare without it.
  # Attention in 4 query blocks of 64 that skip the causal mask's upper triangle: same math,
  # 5/8 of the score work (faster on CPU; experiments/cpu_throughput/ has the A/B).
  c.model.attention_block = 64
  # Dropout masks from a counter hash that XLA fuses into the masked ops, instead of rbg or
  # threefry masks, which XLA writes to memory and reads back (25M per layer for the attention
  # probabilities): the fastest of the three on CPU (experiments/cpu_throughput/).
  c.train.dropout_rng = "hash"

  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99  # Few tokens per step, so a slightly longer second-moment memory.

  c.train.steps = 5000
  c.train.batch_size = 64
  c.train.eval_every = 250
  c.train.eval_steps = 200
  c.train.log_every = 10

  c.checkpoint.every = 500
  return c
