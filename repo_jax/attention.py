"""Attention kernels behind one function, chosen by `ModelConfig.attention_impl`.

Which keys a query may see is described by integer vectors, not a dense mask, so
that every kernel (and the KV cache) shares one rule:
  key j is visible to query i  iff  kv_index[j] <= q_index[i]
                                 and kv_segment[j] == q_segment[i].
`index` is the token's slot in the sequence (or cache), never a RePo position;
`segment` separates packed documents, and padding gets its own segment (-1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_index, kv_index, q_segment, kv_segment) -> jnp.ndarray:
    """Boolean [B, Tq, Tk] visibility mask from the rule above."""
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    same = kv_segment[:, None, :] == q_segment[:, :, None]
    return causal & same


def _xla(q, k, v, mask):
    """Reference: full [Tq, Tk] logits in float32; grouped-query heads share K/V."""
    b, tq, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, tq, kv, h // kv, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def _cudnn(q, k, v, mask):
    # jax raises its own clear error when no cuDNN-capable GPU is present.
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")


def attend(q, k, v, *, q_index, kv_index, q_segment, kv_segment, impl: str = "xla",
           block_size: int = 512) -> jnp.ndarray:
    """q [B,Tq,H,D], k/v [B,Tk,KV,D] (H a multiple of KV) -> [B,Tq,H,D]."""
    if impl == "xla":
        return _xla(q, k, v, visible(q_index, kv_index, q_segment, kv_segment))
    if impl == "cudnn":
        return _cudnn(q, k, v, visible(q_index, kv_index, q_segment, kv_segment))
    raise ValueError(f"attention_impl={impl!r} is not available; use 'xla' or 'cudnn'")
