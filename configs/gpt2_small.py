"""GPT-2 small (124M): 12 layers x 768, 12 heads, block 1024, vocab 50257, tied embeddings, biases.

  jaxlm params --config configs/gpt2_small.py --device "TPU v4" --num_devices 8
  jaxlm train --config configs/gpt2_small.py --workdir runs/gpt2_small

Expected: `jaxlm params` reports 124,439,808 parameters (GPT-2's 124M; 85.0M in the blocks,
38.6M in the token embedding, 0.8M in the position embedding) and 8.6e8 training FLOPs per
token, in seconds on a CPU without allocating them. The tokenizer is `byte` so that this
report needs no corpus and no tokenizer file, with model.vocab_size set to GPT-2's 50257
explicitly (an embedding row per BPE token; a byte corpus uses only the first 256). To train
with BPE, point data.tokenizer at GPT-2's tokenizer.json, or set data.tokenizer=bpe and
data.vocab_size to train one on the corpus. Training it means a TPU or GPU and a corpus of
billions of tokens (nanoGPT: OpenWebText, ~2.9 val loss).
"""

from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.data.tokenizer = "byte"  # Offline stand-in; see the docstring for BPE.

  c.model.n_layer = 12
  c.model.n_head = 12
  c.model.d_model = 768
  c.model.block_size = 1024
  c.model.vocab_size = 50257  # GPT-2's BPE vocabulary, set explicitly (see the docstring).
  c.model.dropout = 0.0
  c.model.bias = True
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"  # bf16 matmuls on TPU/GPU; params and optimizer state stay f32.

  # nanoGPT's OpenWebText recipe: ~0.5M tokens per step (480 x 1024).
  c.train.batch_size = 480
  c.train.grad_accum = 4  # 15 sequences per device per microbatch: fits 8 x 32 GiB TPU v4.
  c.train.steps = 600_000
  c.optim.lr = 6e-4
  c.optim.min_lr = 6e-5
  c.optim.warmup_steps = 2000
  c.mesh.rules = "fsdp"
  return c
