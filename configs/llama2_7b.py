"""LLaMA 2 7B shapes (Touvron et al. 2023): for `jaxlm params` and a TPU pod, not a laptop.

  jaxlm train --config configs/llama2_7b.py --workdir gs://bucket/llama2_7b

Expected: `jaxlm params --config configs/llama2_7b.py` reports 6,738,415,616 parameters, the
count of Meta's checkpoint (32,000-token SentencePiece vocabulary, untied head).
"""

from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.data.tokenizer = "byte"  # Stand-in: the real run needs LLaMA 2's 32k tokenizer.

  c.model.family = "llama"
  c.model.n_layer = 32
  c.model.n_head = 32
  c.model.n_kv_head = 0  # Plain multi-head attention at 7B.
  c.model.d_model = 4096
  c.model.d_ff = 11008  # The LLaMA rule for 4096, written out.
  c.model.block_size = 4096
  c.model.vocab_size = 32000
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.scan_layers = True

  c.optim.lr = 3e-4
  c.optim.min_lr = 3e-5
  c.optim.warmup_steps = 2000
  c.optim.b2 = 0.95
  c.train.batch_size = 1024  # 4M tokens per step, as the paper.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
