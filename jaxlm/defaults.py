"""The base config: every hyperparameter jaxlm knows, with its default and what it means.

Experiment files in configs/ start from `base_config()` and change only what differs, so a
config reads as a short diff and a misspelt key fails (the config is locked by the CLI).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def source(path: str = "", *, weight: float = 1.0, val_path: str = "", kind: str = "auto",
           text_field: str = "text") -> ml_collections.ConfigDict:
  """One entry of data.sources, every key present so that --config.data.sources.NAME.KEY=V
  can override any of them (see jaxlm/corpus/spec.py for what they mean)."""
  return ml_collections.ConfigDict(dict(path=path, weight=weight, val_path=val_path, kind=kind,
                                        text_field=text_field))


def group(*, match: str = "", roles: str = "", optimizer: str = "adamw", lr_mult: float = 1.0,
          weight_decay: float | None = None) -> ml_collections.ConfigDict:
  """One entry of optim.groups, every key present so that --config.optim.groups.NAME.KEY=V can
  override any of them.

  A group takes the parameters that have one of its `roles` (comma-separated: matrices =
  kernels in the blocks, embeddings, head = an untied output head, norms = norm scales,
  biases = biases and LayerNorm shifts) and whose path (e.g. "h_0/attn/query/kernel") the
  regex `match` finds; give one or both. `lr_mult` scales the shared schedule; `weight_decay`
  None = optim.weight_decay on the group's kernels and embeddings, a number = that decay on
  every tensor of the group.
  """
  return ml_collections.ConfigDict(dict(
      match=match, roles=roles, optimizer=optimizer, lr_mult=float(lr_mult),
      weight_decay=config_dict.placeholder(float) if weight_decay is None
      else config_dict.FieldReference(float(weight_decay), field_type=float)))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, the data order and dropout (each via its own stream).
  # XLA flags for this run (jaxlm train/bench put them in XLA_FLAGS; your own XLA_FLAGS win):
  # "auto" = the flags jaxlm measured to help with the installed jaxlib (jaxlm/host/xla.py says
  # which and why; on jaxlib 0.10 CPU: no YNNPACK fusions, 4-13% faster steps), "" =
  # none, or explicit "--xla_...=... --xla_...=...".
  c.xla_flags = "auto"
  # Persistent compilation cache of jaxlm train: a rerun loads its compiled programs instead
  # of compiling them. "auto" = $XDG_CACHE_HOME/jaxlm/xla, "" = off, or a directory (gs://
  # works); JAX_COMPILATION_CACHE_DIR wins.
  c.compile_cache = "auto"
  # The process's malloc (jaxlm train and bench restart once with it preloaded): "auto" =
  # tcmalloc, else jemalloc, if installed (XLA:CPU's per-step temporaries then reuse their
  # pages instead of faulting in fresh ones: the large shakespeare step is 12-17% faster;
  # jaxlm/host/allocator.py says why), else the system's; "system"; "tcmalloc"; "jemalloc"; or the
  # path of a malloc library.
  c.host_allocator = "auto"

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # UTF-8 text file or glob; "" = tiny-shakespeare shipped with jaxlm.
  # char (vocab from the corpus) | byte (256 symbols, any bytes) | bpe (byte-level BPE trained
  # on the corpus, needs jaxlm[bpe]) | the path of a tokenizer.json (jaxlm's or Hugging Face's).
  c.data.tokenizer = "char"
  c.data.vocab_size = 1024  # Target vocabulary of the bpe tokenizer (256 bytes + merges).
  # data.path: the last 10% of tokens are the validation split. data.sources: the fraction of
  # each source's documents held out for validation (spread over the source, by a hash).
  c.data.val_fraction = 0.1
  c.data.cache_dir = ""  # Token cache and stores; "" = $XDG_CACHE_HOME/jaxlm/tokens.
  # Real corpora: named sources of documents, mixed by weight, tokenized ahead (jaxlm prepare,
  # or the first jaxlm train) into a token store; each document ends with an end-of-text
  # token. Replaces data.path. A source is a ConfigDict of path (files, glob, directory, local
  # or gs://: text, .gz/.xz/.zst, JSONL, Parquet, a saved HF dataset), weight (default 1; 0 =
  # evaluated only), val_path ("" = hold out val_fraction of path's documents), kind (auto)
  # and text_field ("text"); make one with defaults.source(path, weight=...). Keys, errors and
  # examples: jaxlm/corpus/spec.py.
  c.data.sources = ml_collections.ConfigDict()
  c.data.store = ""  # The token store directory (or gs:// one, prepared); "" = in cache_dir.
  c.data.rows = "windows"  # Rows start anywhere (windows) or at a document start (documents).
  c.data.bpe_sample_mb = 64  # A trained bpe learns from this many MB spread over the sources.
  # A JSONL line that is not JSON or lacks the text field, a bad Parquet/dataset row: fail
  # (a one-line error naming file and line) | skip (skipped and counted in the prepare log).
  c.data.on_bad_record = "fail"

  c.model = ml_collections.ConfigDict()
  # Architecture presets: gpt2 (LayerNorm, learned positions, GELU MLP, biases, tied head) |
  # llama (RMSNorm, RoPE, SwiGLU, no biases, untied head, d_ff = 8/3 d_model rounded up to
  # 256). Each key below left at ""/None/0 takes the family's value; set it to mix and match.
  c.model.family = "gpt2"
  c.model.norm = ""  # layernorm | rmsnorm.
  c.model.norm_eps = 0.0  # Epsilon of the norms; 0 = 1e-5.
  c.model.position = ""  # learned (wpe table of block_size rows) | rope (rotary, no params).
  c.model.rope_theta = 0.0  # RoPE base; 0 = 10000 (LLaMA 1/2; LLaMA 3 uses 500000).
  # gelu | swiglu | relu2 (squared ReLU, relu(x)^2: So et al. 2021 "Primer", modded-nanogpt;
  # the same two matrices as gelu).
  c.model.mlp = ""
  c.model.n_layer = 12
  c.model.n_head = 12
  c.model.n_kv_head = 0  # 0 = n_head; fewer = grouped-query attention.
  c.model.d_model = 768
  c.model.d_ff = 0  # 0 = 4 * d_model (gpt2) or the LLaMA rule (llama).
  c.model.block_size = 1024  # Context length L.
  c.model.vocab_size = 0  # 0 = the tokenizer's vocabulary size.
  c.model.dropout = 0.0
  c.model.bias = config_dict.placeholder(bool)  # Biases in linears and norms; None = preset.
  # Output head shares the token embedding matrix; None = preset.
  c.model.tie_embeddings = config_dict.placeholder(bool)
  # Matmul compute dtype: auto = bfloat16 on GPUs and TPUs, float32 on CPUs; or float32,
  # bfloat16, float16. Params stay param_dtype; softmax, logits and loss always run in f32.
  c.model.dtype = "auto"
  c.model.param_dtype = "float32"
  c.model.remat = "none"  # Activation recomputation per block: none | full | dots.
  c.model.scan_layers = False  # nn.scan over blocks: compile time flat in depth.
  # Training attention in blocks of this many query rows, each scoring only the keys up to its
  # last row (the causal mask's upper triangle is skipped): the same math with fewer FLOPs and
  # one more loop in the compiled step; 0 = the whole sequence at once. Helps on CPU.
  c.model.attention_block = 0
  # The attention kernel (jaxlm/attention.py): auto = cuDNN flash attention on NVIDIA GPUs and
  # splash on TPUs where the model allows (else xla), jaxlm's einsum path on CPUs; or einsum,
  # xla, cudnn, splash explicitly. The run's log says what auto picked and why.
  c.model.attention_impl = "auto"
  # Modern recipe options (issue 19), all off by default; Hugging Face export refuses them.
  # RMSNorm of each query and key head over the head dim (a learned [head_dim] scale per layer
  # for each), before RoPE and the scores: OLMo 2, Gemma 3, modded-nanogpt. RMSNorm whatever
  # model.norm is (jaxlm/model.py qk_norm says why).
  c.model.qk_norm = False
  # Final logits = cap * tanh(logits / cap) in float32, in training, eval and sampling
  # (Gemma 2, modded-nanogpt use 30 and 15); 0 = off.
  c.model.logit_softcap = 0.0
  # The attention-out and MLP-out projection kernels start at zero, so each block starts as
  # the identity (modded-nanogpt); every other init is unchanged.
  c.model.zero_init_proj = False
  # Sliding-window attention per layer: "" = full causal attention in every layer; else
  # comma-separated entries cycled over the layers, each "full" or an integer W >= 1, where
  # the query at position t attends to the keys at t-W+1 .. t (W = 1: only itself; W >=
  # block_size: the same as full). E.g. "128,128,128,full" = Gemma 2/3-style local/global.
  c.model.attention_window = ""
  # Parametrization (issue 20): sp (standard: GPT-2's init, 1/sqrt(head_dim) attention) | mup
  # (Maximal Update Parametrization, Tensor Programs V: hyperparameters tuned at
  # mup_base_width transfer to wider models). Under mup, hidden kernels init with std /
  # sqrt(width_mult) and train at lr / width_mult (Adam-type optimizers; sgd has its own
  # rule, muon none), logits are multiplied by mup_base_width / d_model and attention scores
  # by sqrt(base head dim) / head_dim. At d_model = mup_base_width, mup is exactly sp.
  # jaxlm/mup.py has the rule table; `jaxlm params` shows each tensor's role and multipliers.
  c.model.parametrization = "sp"
  c.model.mup_base_width = 0  # d_model of the base model; mup needs 1 <= it <= d_model.
  c.model.mup_base_head_dim = 0  # 0 = mup_base_width / n_head.

  c.optim = ml_collections.ConfigDict()
  # adamw | lion | sgd (momentum b1) | adafactor (factored second moments, no momentum; lr is
  # an absolute step size as for adamw) | muon (the recipe: Newton-Schulz-orthogonalized
  # momentum on the hidden matrices, adamw on everything else; see muon_*) |
  # schedule_free_adamw (Defazio et al. 2024: warmup then constant lr whatever
  # optim.schedule says; evaluation, samples and checkpoints use its averaged params). All are
  # optax's (jaxlm/optim.py).
  c.optim.name = "adamw"
  c.optim.lr = 6e-4  # Peak learning rate, reached after warmup.
  c.optim.min_lr = 6e-5  # The cosine, linear and wsd decays end here at train.steps.
  c.optim.warmup_steps = 2000  # Linear warmup from 0, for every schedule.
  # After warmup: cosine | linear (decay to min_lr at train.steps) | constant (lr to the end) |
  # wsd (warmup-stable-decay: lr, then a decay over the last decay_fraction of the steps).
  # `jaxlm params --config C --plot_lr lr.png` draws it, per group.
  c.optim.schedule = "cosine"
  c.optim.decay_fraction = 0.2  # wsd: the share of train.steps spent decaying, in [0, 1].
  # wsd: linear | cosine | sqrt (1 - sqrt(progress): MiniCPM, arXiv:2404.06395; Hägele et al.,
  # arXiv:2405.18392, where a 1 - sqrt cooldown matches a full cosine schedule).
  c.optim.decay_shape = "sqrt"
  c.optim.b1 = 0.9  # adamw, lion, sgd (momentum; 0 = none); schedule-free's interpolation.
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  # Decoupled (lr * weight_decay * p per step); kernels and embeddings only, never biases or
  # norm scales (a group with its own weight_decay decays all of its tensors).
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0  # Clip by global norm, over all groups at once; 0 = off.
  c.optim.muon_beta = 0.95  # Muon's (Nesterov) momentum.
  # Muon's updates are scaled to this RMS (Liu et al., arXiv:2502.16982: 0.2 is an AdamW
  # update's), so muon takes adamw's lr and weight decay as they are; 0 = Jordan's
  # sqrt(max(1, fan_out / fan_in)) scaling, which wants lr ~0.02 and a small muon_adam_lr_mult.
  c.optim.muon_rms = 0.2
  # optim.name = muon without groups: the lr_mult of the adamw part (embeddings, head, norms,
  # biases). 1 because muon_rms already puts both parts on adamw's lr scale.
  c.optim.muon_adam_lr_mult = 1.0
  # Parameter groups: named groups, each with its own optimizer, lr multiplier (on the one
  # schedule) and weight decay; make one with defaults.group(...). Empty = one optimizer
  # (optim.name) for every tensor. Otherwise every parameter must be in exactly one group, and
  # optim.name is unused. E.g. (muon on the blocks' matrices, adamw on the rest):
  #   c.optim.groups.hidden = defaults.group(roles="matrices", optimizer="muon")
  #   c.optim.groups.rest = defaults.group(roles="embeddings,head,norms,biases")
  c.optim.groups = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600_000
  c.train.batch_size = 480  # Global batch, in sequences, summed over every device and host.
  c.train.grad_accum = 1  # Microbatches per step (batch_size must divide by it).
  c.train.eval_every = 2000  # Steps between evaluations (and at the end).
  c.train.eval_steps = 20  # Batches per evaluation, fixed across evaluations.
  # Downstream tasks scored at every evaluation (tasks/<name>/acc, ..., and tasks/core, the
  # chance-centred mean accuracy, with two or more): comma-separated names of shipped tasks
  # (shakespeare_next_line, shakespeare_last_word, shakespeare_complete_word) or task files
  # (.yaml/.json; the format is in jaxlm/tasks/task.py); "" = none.
  c.train.eval_tasks = ""
  # A task example longer than model.block_size: "left" keeps its last block_size tokens (as
  # lm-eval does), "error" refuses it, naming the example.
  c.train.eval_tasks_truncation = "left"
  c.train.log_every = 10  # Steps between log lines; metrics leave the device only then.
  # Train steps per jitted call (a lax.scan over batches): the same math with less dispatch
  # overhead, which matters for small models. Calls never cross a log/eval/checkpoint step.
  c.train.steps_per_call = 1
  # Steps between per-layer parameter norms, gradient norms and update/parameter ratios in
  # metrics.jsonl (params/norm/h_0, grads/norm/h_0, update_ratio/h_0, ...); a multiple of
  # log_every; 0 = off. They are reduced inside the jitted step, so they cost no extra sync.
  c.train.log_params_every = 0
  c.train.z_loss = 0.0  # Coefficient of PaLM's z-loss; 0 = off.
  c.train.init_from = ""  # Workdir of another run whose latest params start this one.
  # Generator of dropout masks: threefry2x32 (JAX's default, the same bits everywhere) | rbg
  # (XLA's RngBitGenerator: faster masks, bits may differ across backends) | hash (a counter
  # hash fused into the masked op: no mask in memory, the same bits on any mesh; fastest on
  # CPU). See jaxlm/config.py (DROPOUT_RNGS) and kernels.HashDropout.
  c.train.dropout_rng = "threefry2x32"
  c.train.stop_at = 0  # Stop with a checkpoint after this step, as if preempted; 0 = off.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000  # Steps between checkpoints (and at the end); 0 = only at the end.
  c.checkpoint.keep = 3  # Most recent checkpoints kept (plus the best by val loss).

  c.metrics = ml_collections.ConfigDict()
  # Weights & Biases, besides metrics.jsonl and TensorBoard (needs jaxlm[wandb]): the same
  # records at the same steps, the resolved config, and a table per evaluation. The run's id
  # is kept in the workdir's wandb_run.json, so resuming the workdir continues the W&B run.
  c.metrics.wandb = False
  c.metrics.wandb_project = "jaxlm"
  c.metrics.wandb_entity = ""  # The W&B team or user; "" = your default entity.
  c.metrics.wandb_name = ""  # The run's display name; "" = the workdir's basename.
  c.metrics.wandb_group = ""  # Runs shown together; "" = none (a sweep's trials: the sweep).
  # online | offline (written under WANDB_DIR, uploaded later by `wandb sync`) | disabled;
  # "" = W&B's own choice (WANDB_MODE, `wandb offline`, else online).
  c.metrics.wandb_mode = ""

  c.mesh = ml_collections.ConfigDict()
  # Device mesh (data, fsdp, tensor); one size may be -1 (= the remaining devices).
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = "fsdp"  # Logical->mesh rule preset from jaxlm/axes.py: dp | fsdp | fsdp_tp.

  c.distributed = ml_collections.ConfigDict()
  # Multi-process runs. On a TPU VM slice leave these empty: JAX finds its peers itself.
  # Elsewhere (CPU/GPU clusters) give every process the same address and count, and its id.
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = single process/auto.
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.init_timeout = 300  # Seconds to wait for every peer to join.
  c.distributed.heartbeat_timeout = 100  # Seconds of silence before a peer counts as dead.

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "\n"
  # Steps between the samples written to samples.txt; 0 = only the last step's. The first
  # sample compiles the sampler (off the critical path, while the train step compiles).
  c.sample.every = 0
  c.sample.max_new_tokens = 200
  c.sample.temperature = 0.8  # 0 = greedy.
  c.sample.top_k = 40  # 0 = off.
  c.sample.top_p = 0.95  # 1.0 = off.
  return c
