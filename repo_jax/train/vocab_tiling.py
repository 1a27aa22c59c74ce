"""The training loss without a whole [tokens, vocab] float32 array (vocabulary tiling).

At 100k vocabulary the logits of 8 sequences x 4096 tokens are 13 GB in float32,
and their gradient as much again: more than a chip should spend on one matmul's
output. Here the vocabulary projection and the loss run over the sequence in
chunks of `chunk` tokens under `jax.lax.scan`, each chunk rematerialised in the
backward pass, so only one chunk's logits ever exist. Gradients flow to the
hidden states and the projection weight as usual.
"""
from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from repo_jax.train.loss import lm_loss


# Whole [B, T, V] float32 logits up to this size are not tiled: tiling recomputes every
# chunk's projection in the backward pass (the `long` case of benchmarks/bench_train.py,
# 2 x 2048 tokens, vocab 4096, 64 MiB of logits: 1.19 s/step whole vs 1.22-1.27 s tiled),
# which only pays where the logits and their gradient would not fit beside the model.
UNTILED_MAX_BYTES = 1 << 28


def tiled_lm_loss(project: Callable[[jnp.ndarray], jnp.ndarray], hidden: jnp.ndarray,
                  tokens: jnp.ndarray, chunk: int, loss_mask: jnp.ndarray | None = None, *,
                  untiled_max_bytes: int = UNTILED_MAX_BYTES) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`lm_loss(project(hidden), tokens, loss_mask)` computed `chunk` positions at a time.
    `project`: [B, c, d] -> float32 logits [B, c, V]; hidden [B, T, d]; tokens int32 [B, T];
    loss_mask [B, T] or None. A sequence that fits in one chunk, or a batch whose whole
    logits take at most `untiled_max_bytes` (the global array's size, so never less
    than a device's share), takes the plain path (bitwise the same)."""
    chex.assert_rank(hidden, 3)
    b, t, d = hidden.shape
    chex.assert_shape(tokens, (b, t))
    logits = jax.eval_shape(project, jax.ShapeDtypeStruct((b, 1, d), hidden.dtype))
    whole_bytes = b * t * logits.shape[-1] * jnp.dtype(logits.dtype).itemsize
    if chunk <= 0 or t <= chunk or whole_bytes <= untiled_max_bytes:
        return lm_loss(project(hidden), tokens, loss_mask)
    n = -(-t // chunk)
    pad = n * chunk - t
    # Position i predicts token i + 1; the last position (and any padding) has no target.
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad + 1)))
    weight = jnp.broadcast_to((jnp.arange(n * chunk) < t - 1).astype(jnp.float32), (b, n * chunk))
    if loss_mask is not None:
        chex.assert_shape(loss_mask, (b, t))
        weight = weight * jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, pad + 1)))
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))) if pad else hidden
    h = jnp.swapaxes(h.reshape(b, n, chunk, d), 0, 1)          # [n, B, c, d]
    targets = jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1)  # [n, B, c]
    valid = jnp.swapaxes(weight.reshape(b, n, chunk), 0, 1)     # [n, B, c]

    def body(carry, xs):
        h_c, t_c, v_c = xs
        logits = project(h_c)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        ce, z = carry
        on = v_c > 0
        return (ce + jnp.sum(jnp.where(on, v_c * (lse - target_logit), 0.0)),
                z + jnp.sum(jnp.where(on, v_c * lse * lse, 0.0))), None

    # Save nothing of a chunk: its logits are recomputed in the backward pass.
    body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    zero = jnp.zeros((), jnp.float32)
    (ce, z), _ = jax.lax.scan(body, (zero, zero), (h, targets, valid))
    count = b * (t - 1) if loss_mask is None else jnp.maximum(jnp.sum(weight), 1.0)
    return ce / count, z / count
