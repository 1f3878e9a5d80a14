"""Token-level cross-entropy in float32, with an optional mask and z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array | None = None,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy (nats) over unmasked positions.

  Returns:
    (loss to differentiate, {"loss": cross-entropy alone, "tokens": unmasked count}).
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  if mask_BxL is None:
    mask_BxL = jnp.ones_like(ce_BxL)
  mask_BxL = mask_BxL.astype(jnp.float32)
  n_tokens = jnp.maximum(mask_BxL.sum(), 1.0)
  ce = (ce_BxL * mask_BxL).sum() / n_tokens
  total = ce
  if z_loss:
    # PaLM's z-loss keeps log Z near 0 so logits cannot drift (Chowdhery et al., 2022, §5).
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    total = total + z_loss * ((log_z_BxL**2) * mask_BxL).sum() / n_tokens
  return total, {"loss": ce, "tokens": mask_BxL.sum()}
