"""GPT-2 small (124M) on OpenWebText-style JSONL shards, with a BPE trained on the corpus.

  # In $OWT_DIR (default ~/data/openwebtext): train-*.jsonl.zst shards, one {"text": ...} per
  # line (e.g. Skylion007/openwebtext exported to JSON Lines), and a small held-out
  # val-*.jsonl.zst; plus, as a second source evaluated only, any other corpus in $EVAL_DIR.
  jaxlm prepare --config configs/openwebtext_like.py
  jaxlm train --config configs/openwebtext_like.py --workdir runs/owt

The BPE (vocab 50304 with <|endoftext|>) learns from a 256 MB sample spread over the shards;
evaluation reports val/loss and val/bpb overall and per source (val/owt/..., val/wiki/...),
bits per byte being comparable with runs that use other tokenizers.

Expected: nothing measured here (it needs an accelerator and the 40 GB corpus); nanoGPT reports
val loss ~2.85 for GPT-2 124M on OpenWebText after 600k steps with GPT-2's own tokenizer.
`jaxlm params` needs the trained tokenizer, so run `jaxlm prepare` first, or pass
--config.model.vocab_size=50304 to skip it: 124,475,904 parameters.
"""

import os

from jaxlm import defaults

ROOT = os.environ.get("OWT_DIR", "~/data/openwebtext")
EVAL = os.environ.get("EVAL_DIR", "~/data/wikitext")


def get_config():
  c = defaults.base_config()
  c.data.sources.owt = defaults.source(f"{ROOT}/train-*.jsonl.zst",
                                       val_path=f"{ROOT}/val-*.jsonl.zst")
  # Evaluated only (weight 0): its val/wiki/bpb shows transfer beyond the training corpus.
  c.data.sources.wiki = defaults.source("", weight=0.0, val_path=f"{EVAL}/*.jsonl*")
  c.data.tokenizer = "bpe"
  c.data.vocab_size = 50304
  c.data.bpe_sample_mb = 256
  c.data.rows = "windows"  # nanoGPT's random windows over the token stream.

  c.model.n_layer = 12
  c.model.n_head = 12
  c.model.d_model = 768
  c.model.block_size = 1024
  c.model.dropout = 0.0
  c.model.bias = True
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"

  c.train.batch_size = 480
  c.train.grad_accum = 4
  c.train.steps = 600_000
  c.optim.lr = 6e-4
  c.optim.min_lr = 6e-5
  c.optim.warmup_steps = 2000
  return c
