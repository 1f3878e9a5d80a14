"""GPT-2 small (124M) on FineWeb-style Parquet shards with GPT-2's tokenizer (llm.c's setup).

  # In $FINEWEB_DIR (default ~/data/fineweb): Parquet shards with a "text" column, e.g.
  # HuggingFaceFW/fineweb-edu sample/10BT/*.parquet, and GPT-2's tokenizer.json
  # (openai-community/gpt2), both downloaded ahead: jaxlm itself never downloads.
  jaxlm prepare --config configs/fineweb_like.py      # tokenize ahead on all cores, progress
  jaxlm train --config configs/fineweb_like.py --workdir runs/fw

`jaxlm train` prepares the store itself when `jaxlm prepare` was not run. On a pod slice,
prepare on one machine, copy the store up (gcloud storage cp -r) and set
--config.data.store=gs://BUCKET/fineweb-store: every host then reads its own rows of it.

Expected: the log's mixture line says how many epochs of the corpus the run reads (600k steps
x 480 x 1024 = 295B tokens: ~30 epochs of a 10B-token sample; train.steps=20_000 reads ~1
epoch). No number was measured here (it needs an accelerator and the corpus): for reference,
llm.c's GPT-2 124M reaches 3.28 FineWeb val loss after 10B tokens, the modded-nanogpt
speedrun's target. `jaxlm params --config configs/fineweb_like.py` needs only the tokenizer
file: 124,475,904 parameters (GPT-2's 124M with the vocabulary padded to 50304).
"""

import os

from jaxlm import defaults

ROOT = os.environ.get("FINEWEB_DIR", "~/data/fineweb")


def get_config():
  c = defaults.base_config()
  c.data.sources.fineweb = defaults.source(f"{ROOT}/*.parquet", text_field="text")
  c.data.tokenizer = f"{ROOT}/tokenizer.json"  # GPT-2's: 50257 ids, <|endoftext|> is 50256.
  c.data.val_fraction = 0.0005  # ~5M tokens of a 10B-token sample held out, as nanoGPT's OWT.
  c.data.rows = "documents"  # Rows start at a document's first token, as in nanochat.

  c.model.n_layer = 12
  c.model.n_head = 12
  c.model.d_model = 768
  c.model.block_size = 1024
  c.model.vocab_size = 50304  # 50257 padded to a multiple of 64: faster matmuls (nanoGPT).
  c.model.dropout = 0.0
  c.model.bias = True
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"

  c.train.batch_size = 480  # ~0.5M tokens per step.
  c.train.grad_accum = 4
  c.train.steps = 20_000  # ~9.8B tokens: about one epoch of the 10BT sample.
  c.train.eval_every = 1000
  c.optim.lr = 6e-4
  c.optim.min_lr = 6e-5
  c.optim.warmup_steps = 700
  return c
