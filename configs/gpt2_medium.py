"""GPT-2 medium (350M): 24 layers x 1024, 16 heads, block 1024, vocab 50257, tied embeddings.

  jaxlm params --config configs/gpt2_medium.py --device "TPU v4" --num_devices 8
  jaxlm train --config configs/gpt2_medium.py --workdir runs/gpt2_medium

Expected: `jaxlm params` reports 354,823,168 parameters (GPT-2's "345M"/"350M") and 2.4e9
training FLOPs per token, in seconds on a CPU without allocating them. As in gpt2_small.py,
the tokenizer is `byte` so the report needs no corpus or tokenizer file, model.vocab_size is
set to 50257 explicitly, and data.tokenizer takes GPT-2's tokenizer.json (or bpe) to train.
Training it needs a TPU or GPU slice and billions of tokens.
"""

from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.data.tokenizer = "byte"  # Offline stand-in; see the docstring for BPE.

  c.model.n_layer = 24
  c.model.n_head = 16
  c.model.d_model = 1024
  c.model.block_size = 1024
  c.model.vocab_size = 50257  # GPT-2's BPE vocabulary, set explicitly.
  c.model.dropout = 0.0
  c.model.bias = True
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"  # bf16 matmuls on TPU/GPU; params and optimizer state stay f32.

  c.train.batch_size = 480  # ~0.5M tokens per step, as gpt2_small.
  c.train.grad_accum = 10  # 6 sequences per device per microbatch: fits 8 x 32 GiB TPU v4.
  c.train.steps = 600_000
  c.optim.lr = 3e-4  # GPT-3 paper's rate for this width (350M).
  c.optim.min_lr = 3e-5
  c.optim.warmup_steps = 2000
  c.mesh.rules = "fsdp"
  return c
