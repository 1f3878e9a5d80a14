"""Dimension glossary, logical axis names, and logical->mesh rule presets.

Shape letters (used as tensor-name suffixes and einsum letters):
  B batch, L query length, S key length, D model width (d_model), H query heads,
  G kv heads, K head dim, F MLP hidden (d_ff), V vocab, N layers, P prompt length.

Layers name every parameter dimension with a logical axis below; only the rule tables
here mention the mesh axes (data, fsdp, tensor).
"""

# Logical axis names, one per shape letter.
BATCH = "batch"  # B
LENGTH = "length"  # L, S
EMBED = "embed"  # D
HEADS = "heads"  # H
KV_HEADS = "kv_heads"  # G
HEAD_DIM = "head_dim"  # K
MLP = "mlp"  # F
VOCAB = "vocab"  # V
LAYERS = "layers"  # N

# Mesh axis names.
MESH_AXES = ("data", "fsdp", "tensor")

# Rule presets: logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# Parameters: FSDP shards the embed dimension of every matrix; tensor parallelism shards
# heads / mlp / vocab. Activations: the batch is split over both data and fsdp.
RULES = {
    # Pure data parallel: parameters replicated, batch split over every device.
    "dp": (
        (BATCH, ("data", "fsdp", "tensor")),
    ),
    # ZeRO-3 style: batch over (data, fsdp), parameters sharded along embed over fsdp.
    "fsdp": (
        (BATCH, ("data", "fsdp")),
        (EMBED, "fsdp"),
    ),
    # FSDP plus Megatron-style tensor parallelism over heads, mlp and vocab.
    "fsdp_tp": (
        (BATCH, ("data", "fsdp")),
        (EMBED, "fsdp"),
        (HEADS, "tensor"),
        (KV_HEADS, "tensor"),
        (MLP, "tensor"),
        (VOCAB, "tensor"),
    ),
}
