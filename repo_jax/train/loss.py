"""Next-token cross-entropy with OLMo's z-loss, in float32."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def lm_loss(logits: jnp.ndarray, tokens: jnp.ndarray,
            loss_mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """logits float32 [B, T, V] of an instance `tokens` int32 [B, T] -> (mean CE, mean
    logsumexp^2) over the B * (T - 1) next-token predictions, as OLMo trains (the last
    position has no target). The z-loss term keeps the softmax normaliser near 1.
    `loss_mask` [B, T] (1 where token t is a target) restricts both means to those targets."""
    chex.assert_rank(logits, 3)
    chex.assert_shape(tokens, logits.shape[:2])
    b, t, _ = logits.shape
    # Every position is scored and the last one (no target) weighted 0: slicing it off
    # would copy the whole [B, T, V] array forward and pad its gradient back.
    logits = logits.astype(jnp.float32)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    weight = jnp.broadcast_to((jnp.arange(t) < t - 1).astype(jnp.float32), (b, t))
    if loss_mask is not None:
        chex.assert_shape(loss_mask, tokens.shape)
        weight = weight * jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    count = b * (t - 1) if loss_mask is None else jnp.maximum(jnp.sum(weight), 1.0)
    return jnp.sum((lse - target_logit) * weight) / count, jnp.sum(lse * lse * weight) / count
