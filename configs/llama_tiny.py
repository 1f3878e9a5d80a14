"""A tiny LLaMA (RMSNorm, RoPE, SwiGLU, grouped-query attention) on char-level tiny-shakespeare.

  jaxlm train --config configs/llama_tiny.py --workdir runs/llama_tiny

Expected on a 2-core CPU: val loss 1.830 after 1000 steps (measured, seed 0; 258 s wall with
compile and evals while the two cores were shared with a test run, so less when alone); 1.00M
parameters, none of them biases. The corpus' char-level unigram entropy is 3.31 nats/char.
"""

from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.data.tokenizer = "char"

  c.model.family = "llama"  # RMSNorm, RoPE, SwiGLU, no biases, untied head.
  c.model.n_layer = 4
  c.model.n_head = 4
  c.model.n_kv_head = 2  # Grouped-query attention, as LLaMA 2 70B and LLaMA 3.
  c.model.d_model = 128
  c.model.d_ff = 0  # The LLaMA rule: 8/3 * 128 rounded up to 256 -> 512.
  c.model.block_size = 64
  c.model.dropout = 0.0

  c.optim.lr = 1e-3  # Small models tolerate a higher learning rate.
  c.optim.min_lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99

  c.train.steps = 1000
  c.train.batch_size = 12
  c.train.eval_every = 250
  c.train.eval_steps = 20
  c.train.log_every = 50
  c.train.steps_per_call = 10

  c.checkpoint.every = 500
  return c
