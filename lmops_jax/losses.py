"""Loss functions: pure functions of logits, targets and weights.

All take logits [..., V] in any float dtype and compute in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_with_logits(
    logits: jax.Array,
    targets: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy with optional z-loss and label smoothing.

    Args:
      logits: [..., V].
      targets: [...] integer ids.
      z_loss: coefficient of the auxiliary loss z_loss * log(Z)^2 that keeps the softmax normalizer
        near 1 (PaLM); it is included in the returned loss.
      label_smoothing: mass spread uniformly over the vocabulary; the constant entropy of the smoothed
        target is subtracted so that a perfect model scores 0, as in T5X.

    Returns:
      (loss [...], z_loss term [...]) in float32; `loss` already contains the z-loss term.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    target_logp = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
        loss = -(confidence * target_logp + low * (jnp.sum(log_probs, axis=-1) - target_logp)) - normalizer
    else:
        loss = -target_logp
    z_term = z_loss * jnp.square(log_z)
    return loss + z_term, z_term
