"""LLaMA 3 8B shapes (Meta, 2024): for `jaxlm params` and a TPU pod, not a laptop.

  jaxlm train --config configs/llama3_8b.py --workdir gs://bucket/llama3_8b

Expected: `jaxlm params --config configs/llama3_8b.py` reports 8,030,261,248 parameters, the
count of Meta's checkpoint (128,256-token vocabulary, 8 kv heads, untied head).
"""

from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.data.tokenizer = "byte"  # Stand-in: the real run needs LLaMA 3's 128k tokenizer.

  c.model.family = "llama"
  c.model.n_layer = 32
  c.model.n_head = 32
  c.model.n_kv_head = 8  # Grouped-query attention.
  c.model.d_model = 4096
  c.model.d_ff = 14336
  c.model.block_size = 8192
  c.model.vocab_size = 128256
  c.model.rope_theta = 500000.0
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.scan_layers = True

  c.optim.lr = 3e-4
  c.optim.min_lr = 3e-5
  c.optim.warmup_steps = 2000
  c.train.batch_size = 512
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
