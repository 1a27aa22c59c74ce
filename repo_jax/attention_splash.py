"""Splash attention: the Pallas TPU kernel (jax.experimental.pallas.ops.tpu) behind
`attention_impl="splash"`, sharded with `shard_map` over the batch and head axes.

It computes the visibility rule of `repo_jax.attention` for self-attention, where the
queries and keys are the same T tokens with index = slot 0..T-1 (what the model passes
when there is no KV cache):
  kv_index[j] <= q_index[i]   ->  splash's CausalMask (j <= i)
  kv_segment[j] == q_segment[i] -> splash's SegmentIds
so packed documents and padding (segment -1, left or right) behave exactly as on the
`xla` path: every row sees at least its own token, so no softmax is empty.
What it refuses (ValueError at trace time, never a silent switch to another kernel):
queries and keys of different lengths, i.e. KV-cache prefill and decoding; generate
with attention_impl="xla" or "blockwise".

Grouped-query heads use the kernel's own MHA grouping: query head h reads key head
h // (H / KV), the same grouping as `_xla`; it covers KV=1 too (make_splash_mqa
differs only in taking k without a head axis). Splash does not scale the logits, so q is
multiplied by 1/sqrt(head_dim) first (in q's dtype: one extra rounding under bfloat16).

The kernel runs only on TPU. `interpret=True` (attention_impl="splash_interpret")
runs the same kernel in the Pallas interpreter, on any backend: slow, for tests on CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from repo_jax import sharding as shd

# Splash tiles must be multiples of the TPU's 128 lanes.
LANES = 128
# Segment of the tokens added to fill the last tile: differs from every real segment
# (>= -2), and the added rows see only each other, after every real token.
_PAD_SEGMENT = -3


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _kernel(heads: int, t: int, block: int, interpret: bool) -> sa.SplashAttentionKernel:
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    # Built per shard with the shard's own head count, so no head/sequence sharding of
    # the mask itself is needed; the causal mask's block tables are cached by splash.
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _local(q, k, v, q_segment, kv_segment, *, block: int, interpret: bool):
    """One shard: q [b, H, T, D], k/v [b, KV, T, D], segments [b, T] -> [b, H, T, D]."""
    kernel = _kernel(q.shape[1], q.shape[2], block, interpret)
    return jax.vmap(kernel)(q, k, v, segment_ids=sa.SegmentIds(q_segment, kv_segment))


def splash_attention(q, k, v, *, q_segment, kv_segment, block_size: int = 512,
                     interpret: bool = False) -> jnp.ndarray:
    """q [B,T,H,D], k/v [B,T,KV,D] (H a multiple of KV), int segments [B,T] -> [B,T,H,D].

    Under a mesh context (`jax.sharding.get_abstract_mesh()`, which the train step sets),
    each device runs the kernel on its own rows and heads: batch split like `batch` and
    heads like `heads`/`kv_heads` in `repo_jax.sharding.RULES` (heads stay whole when
    the tensor axis does not divide both head counts). Without a mesh it runs as is."""
    b, t, h, d = q.shape
    if k.shape[1] != t:
        raise ValueError(
            f"attention_impl='splash' computes self-attention over one sequence, but got "
            f"{t} queries against {k.shape[1]} keys (KV-cache prefill or decoding); "
            f"use attention_impl='xla' or 'blockwise' for generation")
    if block_size % LANES:
        raise ValueError(f"attention_block_size={block_size} must be a multiple of {LANES} "
                         f"for attention_impl='splash'")
    block = min(block_size, _round_up(t, LANES))
    tp = _round_up(t, block)
    pad = [(0, 0), (0, tp - t)]
    scale = d ** -0.5
    # The kernel wants heads before the sequence: [B, H, T, D].
    qt = jnp.swapaxes(jnp.pad((q.astype(jnp.float32) * scale).astype(q.dtype), pad + [(0, 0)] * 2), 1, 2)
    kt = jnp.swapaxes(jnp.pad(k, pad + [(0, 0)] * 2), 1, 2)
    vt = jnp.swapaxes(jnp.pad(v, pad + [(0, 0)] * 2), 1, 2)
    qs = jnp.pad(q_segment.astype(jnp.int32), pad, constant_values=_PAD_SEGMENT)
    ks = jnp.pad(kv_segment.astype(jnp.int32), pad, constant_values=_PAD_SEGMENT)

    def local(q, k, v, qs, ks):
        return _local(q, k, v, qs, ks, block=block, interpret=interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch = shd.logical_spec(("batch",), (b,), mesh)[0]
        heads = shd.logical_spec(("heads",), (h,), mesh)[0]
        kv_heads = shd.logical_spec(("kv_heads",), (k.shape[2],), mesh)[0]
        # Each shard must hold whole groups: split heads only if both counts split alike.
        head = heads if heads == kv_heads else None
        q_spec, kv_spec, seg_spec = P(batch, head, None, None), P(batch, head, None, None), P(batch, None)
        # check_vma=False: pallas_call has no replication rule to check against.
        local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                              out_specs=q_spec, check_vma=False)
    out = local(qt, kt, vt, qs, ks)
    return jnp.swapaxes(out, 1, 2)[:, :t]
