"""Attention kernels behind one function, chosen by `ModelConfig.attention_impl`.

Which keys a query may see is described by integer vectors, not a dense mask, so
that every kernel (and the KV cache) shares one rule:
  key j is visible to query i  iff  kv_index[j] <= q_index[i]
                                 and kv_segment[j] == q_segment[i].
`index` is the token's slot in the sequence (or cache), never a RePo position;
`segment` separates packed documents, and padding gets its own segment (-1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from repo_jax.attention_splash import splash_attention
from repo_jax.materialize import materialized


def visible(q_index, kv_index, q_segment, kv_segment) -> jnp.ndarray:
    """Boolean [B, Tq, Tk] visibility mask from the rule above."""
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    same = kv_segment[:, None, :] == q_segment[:, :, None]
    return causal & same


def _xla(q, k, v, mask):
    """Reference: full [Tq, Tk] logits in float32; grouped-query heads share K/V.
    Laid out as plain batched matmuls over [B, KV] with a group's G query heads stacked
    along the rows ([B, KV, G*Tq, D]): XLA:CPU ran the 5-D `bqkgd,bskd->bkgqs` form
    through transposed copies of every [Tq, Tk] array (fwd+bwd 3.6x slower at 2048
    tokens); the transposes here touch only [T, D] arrays."""
    b, tq, h, d = q.shape
    tk, kv = k.shape[1], k.shape[2]
    g = h // kv
    qg = jnp.transpose(q.reshape(b, tq, kv, g, d), (0, 2, 3, 1, 4)).reshape(b, kv, g * tq, d)
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = jnp.broadcast_to(mask[:, None], (b, g, tq, tk)).reshape(b, 1, g * tq, tk)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vt, preferred_element_type=jnp.float32)
    out = jnp.transpose(out.reshape(b, kv, g, tq, d), (0, 3, 1, 2, 4))
    return out.reshape(b, tq, h, d).astype(q.dtype)


# Segments given to the rows and columns added to fill the last tile: they differ from
# each other and from every real segment (>= -2), so nothing ever sees them.
_PAD_Q_SEGMENT, _PAD_KV_SEGMENT = -3, -4


def _tiles(x: jnp.ndarray, block: int, fill=0) -> jnp.ndarray:
    """[B, T, ...] -> [T / block, B, block, ...], padding T up with `fill`."""
    b, t = x.shape[:2]
    n = -(-t // block)
    x = jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)


def _untile(x: jnp.ndarray, t: int) -> jnp.ndarray:
    """Inverse of `_tiles`: [n, B, block, ...] -> [B, t, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _tile_logits(qb, kb, mask, scale):
    """Scaled float32 logits [B, KV, G, bq, bk] of one tile, -inf where hidden."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_index, kv_index, q_segment, kv_segment, block):
    return _flash_fwd(q, k, v, q_index, kv_index, q_segment, kv_segment, block)[0]


def _flash_fwd(q, k, v, q_index, kv_index, q_segment, kv_segment, block):
    b, tq, h, d = q.shape
    tk, kv = k.shape[1], k.shape[2]
    bq, bk = min(block, tq), min(block, tk)
    scale = d ** -0.5
    q_t = _tiles(q.reshape(b, tq, kv, h // kv, d), bq)
    qi_t, qs_t = _tiles(q_index, bq), _tiles(q_segment, bq, _PAD_Q_SEGMENT)
    k_t, v_t = _tiles(k, bk), _tiles(v, bk)
    ki_t, ks_t = _tiles(kv_index, bk), _tiles(kv_segment, bk, _PAD_KV_SEGMENT)

    def q_block(args):
        qb, qi, qs = args

        def kv_block(carry, xs):
            kb, vb, ki, ks = xs
            mask = visible(qi, ki, qs, ks)

            def update(carry):
                m, l, acc = carry
                s = _tile_logits(qb, kb, mask, scale)
                m_new = jnp.maximum(m, s.max(-1))
                # A row that has seen nothing yet keeps m = -inf; shift by 0 instead.
                shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - shift[..., None])
                alpha = jnp.exp(m - shift)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            # Tiles wholly above the diagonal (or across documents) cost nothing.
            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

        shape = (b, kv, h // kv, bq)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, d)))
        (m, l, acc), _ = jax.lax.scan(kv_block, init, (k_t, v_t, ki_t, ks_t))
        seen = l > 0  # false only for the rows added to fill the last tile
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return jnp.moveaxis(out, 3, 1), lse  # [B, bq, KV, G, D], [B, KV, G, bq]

    out_t, lse_t = jax.lax.map(q_block, (q_t, qi_t, qs_t))
    out = _untile(out_t, tq).reshape(b, tq, h, d).astype(q.dtype)
    residuals = (q, k, v, q_index, kv_index, q_segment, kv_segment, out, lse_t)
    return out, residuals


def _flash_bwd(block, residuals, d_out):
    """Recompute each tile's probabilities from the saved log-sum-exp (FlashAttention-2
    backward): dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q."""
    q, k, v, q_index, kv_index, q_segment, kv_segment, out, lse_t = residuals
    b, tq, h, d = q.shape
    tk, kv = k.shape[1], k.shape[2]
    g = h // kv
    bq, bk = min(block, tq), min(block, tk)
    scale = d ** -0.5
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, Tq, H]
    q_t = _tiles(q.reshape(b, tq, kv, g, d), bq)
    do_t = _tiles(d_out.reshape(b, tq, kv, g, d), bq)
    delta_t = jnp.moveaxis(_tiles(delta.reshape(b, tq, kv, g), bq), 2, -1)  # [n, B, KV, G, bq]
    qi_t, qs_t = _tiles(q_index, bq), _tiles(q_segment, bq, _PAD_Q_SEGMENT)
    k_t, v_t = _tiles(k, bk), _tiles(v, bk)
    ki_t, ks_t = _tiles(kv_index, bk), _tiles(kv_segment, bk, _PAD_KV_SEGMENT)

    def kv_block(dq_t, xs):
        kb, vb, ki, ks = xs

        def q_block(carry, ys):
            qb, dob, lse, dlt, qi, qs, dq = ys
            mask = visible(qi, ki, qs, ks)

            def update(args):
                (dk, dv), dq = args
                p = jnp.exp(_tile_logits(qb, kb, mask, scale) - lse[..., None])
                dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, dob, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - dlt[..., None]) * scale
                dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kb, preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb, preferred_element_type=jnp.float32)
                return (dk, dv), dq

            carry, dq = jax.lax.cond(jnp.any(mask), update, lambda a: a, (carry, dq))
            return carry, dq

        zeros = jnp.zeros((b, bk, kv, d), jnp.float32)
        (dk, dv), dq_t = jax.lax.scan(q_block, (zeros, zeros),
                                      (q_t, do_t, lse_t, delta_t, qi_t, qs_t, dq_t))
        return dq_t, (dk, dv)

    dq_t = jnp.zeros(q_t.shape, jnp.float32)
    dq_t, (dk_t, dv_t) = jax.lax.scan(kv_block, dq_t, (k_t, v_t, ki_t, ks_t))
    dq = _untile(dq_t, tq).reshape(b, tq, h, d).astype(q.dtype)
    dk, dv = _untile(dk_t, tk).astype(k.dtype), _untile(dv_t, tk).astype(v.dtype)
    # Integer index and segment inputs have no cotangent.
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _blockwise(q, k, v, *, q_index, kv_index, q_segment, kv_segment, block_size: int):
    """Memory-linear attention (FlashAttention's online softmax in plain JAX): the
    result of `_xla`, computed one [block, block] tile at a time so that neither the
    forward nor the backward pass holds a [Tq, Tk] array; memory grows linearly with
    the sequence, which is what lets a 16K-token forward fit on a CPU."""
    return _flash(q, k, v, q_index.astype(jnp.int32), kv_index.astype(jnp.int32),
                  q_segment.astype(jnp.int32), kv_segment.astype(jnp.int32), block_size)


def _cudnn(q, k, v, mask):
    # jax raises its own clear error when no cuDNN-capable GPU is present.
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")


# Tile size of the `xla` choice on CPU (below). Measured fwd+bwd on 2 shared cores, in one
# run against the dense path: 4 x 512 tokens, 8 heads of 64: 472 ms vs 719 ms; 2 x 2048
# tokens: 545 ms vs 2540 ms (benchmarks/bench_train.py shows the whole step).
_CPU_TILE = 128
# From this many tokens, `_chunked_bwd` takes dK and dV from transposed copies of Q and dO.
_COPY_ROWS_MIN_T = 1024
# The causal chunks of the CPU path (below) keep their probabilities for the backward
# pass, about B*H*T*T/2 float32 values per layer; above this many the tiled path runs.
_CPU_CHUNKED_MAX = 1 << 26


def _chunk_spans(t: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, t)) for start in range(0, t, chunk)]


def _chunk_mask(q_index, kv_index, q_segment, kv_segment, start: int, end: int, g: int):
    """`visible` for query rows [start, end) against keys [0, end), repeated for the G
    query heads stacked along the rows: [B, 1, G * (end - start), end]."""
    mask = visible(q_index[:, start:end], kv_index[:, :end], q_segment[:, start:end],
                   kv_segment[:, :end])
    b, c, _ = mask.shape
    return jnp.broadcast_to(mask[:, None, None], (b, 1, g, c, end)).reshape(b, 1, g * c, end)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked(q, k, v, q_index, kv_index, q_segment, kv_segment, chunk):
    return _chunked_fwd(q, k, v, q_index, kv_index, q_segment, kv_segment, chunk)[0]


def _chunked_fwd(q, k, v, q_index, kv_index, q_segment, kv_segment, chunk):
    """Each chunk is `_xla` on its rows: same layout (a group's G query heads stacked
    along the rows of a [B, KV] batch), same masking and float32 softmax."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    q5 = jnp.transpose(q.reshape(b, t, kv, g, d), (0, 2, 3, 1, 4))  # [B, KV, G, T, D]
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, KV, T, D]
    outs, probs = [], []
    for start, end in _chunk_spans(t, chunk):
        rows = q5[:, :, :, start:end].reshape(b, kv, g * (end - start), d)
        logits = jnp.einsum("bkqd,bksd->bkqs", rows, kt[:, :, :end],
                            preferred_element_type=jnp.float32) * (d ** -0.5)
        mask = _chunk_mask(q_index, kv_index, q_segment, kv_segment, start, end, g)
        p = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
        probs.append(p)
        o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vt[:, :, :end],
                       preferred_element_type=jnp.float32)
        outs.append(o.reshape(b, kv, g, end - start, d))
    o5 = jnp.concatenate(outs, axis=3)  # [B, KV, G, T, D]
    out = jnp.transpose(o5, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
    return out, (q5, kt, vt, o5, probs, q_index, kv_index, q_segment, kv_segment)


def _chunked_bwd(chunk, residuals, d_out):
    """FlashAttention's backward on each chunk's saved probabilities P:
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q.
    Written out rather than left to autodiff because the row sums come from [T, D]
    arrays instead of a pass over every [Tq, Tk] chunk, and dK, dV are accumulated
    across chunks as [D, T] (the faster XLA:CPU dot form for a product summed over query
    rows) and transposed once at the end."""
    q5, kt, vt, o5, probs, q_index, kv_index, q_segment, kv_segment = residuals
    b, kv, g, t, d = q5.shape
    f32 = jnp.float32
    q5f, ktf, vtf = q5.astype(f32), kt.astype(f32), vt.astype(f32)
    do5 = jnp.transpose(d_out.reshape(b, t, kv, g, d), (0, 2, 3, 1, 4)).astype(f32)
    delta = jnp.sum(do5 * o5, axis=-1)  # [B, KV, G, T]
    dk_t = jnp.zeros((b, kv, d, t), f32)
    dv_t = jnp.zeros((b, kv, d, t), f32)
    # Summed over query rows, the dK/dV products contract the rows' major dimension: a
    # form XLA:CPU gives to its slower Eigen dot (as weight gradients, `repo_jax.linear`).
    # From copies of Q and dO laid out [B, KV, D, G, T] they are plain matmuls: fwd+bwd
    # 0.86x the time at 2 x 2048 and 0.89x at 1 x 1024 tokens, but 1.15x at 4 x 512, where
    # the copies cost more than the short products lose (benchmarks/bench_attention_cpu.py,
    # `chunks` against `chunks-nocopy`).
    copy_rows = t >= _COPY_ROWS_MIN_T
    if copy_rows:
        q_cols = jax.lax.optimization_barrier(jnp.transpose(q5f, (0, 1, 4, 2, 3)))
        do_cols = jax.lax.optimization_barrier(jnp.transpose(do5, (0, 1, 4, 2, 3)))
    dqs = []
    for (start, end), p in zip(_chunk_spans(t, chunk), probs):
        c = end - start
        rows = q5f[:, :, :, start:end].reshape(b, kv, g * c, d)
        d_rows = do5[:, :, :, start:end].reshape(b, kv, g * c, d)
        # Left operands of the products summed over these rows, and their contraction.
        if copy_rows:
            q_sum = q_cols[..., start:end].reshape(b, kv, d, g * c)
            do_sum = do_cols[..., start:end].reshape(b, kv, d, g * c)
            row_sum_spec = "bkdq,bkqs->bkds"
        else:
            q_sum, do_sum, row_sum_spec = rows, d_rows, "bkqd,bkqs->bkds"
        dv_t = dv_t.at[..., :end].add(jnp.einsum(row_sum_spec, do_sum, p))
        dp = jnp.einsum("bkqd,bksd->bkqs", d_rows, vtf[:, :, :end])
        row_sum = delta[:, :, :, start:end].reshape(b, kv, g * c, 1)
        # Hidden keys have P = 0; the select also keeps a row that sees nothing (which
        # the masked softmax spreads evenly) from sending gradient to hidden keys.
        mask = _chunk_mask(q_index, kv_index, q_segment, kv_segment, start, end, g)
        ds = jnp.where(mask, p * (dp - row_sum), 0.0) * (d ** -0.5)
        dqs.append(jnp.einsum("bkqs,bksd->bkqd", ds, ktf[:, :, :end]).reshape(b, kv, g, c, d))
        dk_t = dk_t.at[..., :end].add(jnp.einsum(row_sum_spec, q_sum, ds))
    def to_token_major(dq5, dk_t, dv_t):
        # Flattened heads: a reshape that only a transposed copy allows, so that layout
        # assignment cannot turn the transposes into a layout change for the consumer.
        return (jnp.transpose(dq5, (0, 3, 1, 2, 4)).reshape(b, t, -1),
                jnp.transpose(dk_t, (0, 3, 1, 2)).reshape(b, t, -1),
                jnp.transpose(dv_t, (0, 3, 1, 2)).reshape(b, t, -1))

    # Each transpose written out once: fused into its consumers (the RoPE backward, twice
    # over) it was a strided read inside every one of them (`repo_jax.materialize`).
    dq, dk, dv = (x.reshape(b, t, -1, d) for x in
                  materialized(to_token_major, jnp.concatenate(dqs, axis=3), dk_t, dv_t))
    # Integer index and segment inputs have no cotangent.
    return dq.astype(q5.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), None, None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _causal_chunks(q, k, v, *, q_index, kv_index, q_segment, kv_segment, chunk: int):
    """Whole-sequence attention (slots in order: index[j] = j) as T/chunk dense pieces:
    query chunk i against keys [0, end of chunk i) only, each masked by `visible`. Skips
    what lies above the diagonal chunks, like the tiled path, but as a few large batched
    matmuls with no loop: fwd+bwd 1.7x and 1.9x faster than the tiled path on XLA:CPU at
    4 x 512 and 2 x 2048 tokens (idle; benchmarks/bench_attention_cpu.py). The gradient
    is written out (`_chunked_bwd`): fwd+bwd 1.03x and 1.19x faster than autodiff of the
    same chunks at those sizes (one run, `chunks-ad` in that benchmark)."""
    return _chunked(q, k, v, q_index.astype(jnp.int32), kv_index.astype(jnp.int32),
                    q_segment.astype(jnp.int32), kv_segment.astype(jnp.int32), chunk)


def _cpu_chunk(t: int) -> int:
    """At most 8 chunks (the graph is unrolled), at least one tile each."""
    return max(_CPU_TILE, -(-t // 8))


def attend(q, k, v, *, q_index, kv_index, q_segment, kv_segment, impl: str = "xla",
           block_size: int = 512) -> jnp.ndarray:
    """q [B,Tq,H,D], k/v [B,Tk,KV,D] (H a multiple of KV) -> [B,Tq,H,D].

    `xla` on a CPU, for a whole sequence (Tq == Tk, at least two tiles): causal chunks
    (dense pieces that skip what lies above the diagonal) while their saved
    probabilities stay under `_CPU_CHUNKED_MAX` values, else the tiled path with
    cache-sized tiles, which never writes a [Tq, Tk] array; both equal the dense result
    to float32 round-off (tested). The choice is made per platform when XLA lowers
    (`lax.platform_dependent`), so a CPU host compiling for TPU still gets the dense
    kernel there."""
    if impl == "xla":
        def dense(q, k, v):
            return _xla(q, k, v, visible(q_index, kv_index, q_segment, kv_segment))

        if q.shape[1] != k.shape[1] or q.shape[1] < 2 * _CPU_TILE:
            return dense(q, k, v)

        b, t, h, _ = q.shape
        if b * h * t * t // 2 <= _CPU_CHUNKED_MAX:
            def on_cpu(q, k, v):
                return _causal_chunks(q, k, v, q_index=q_index, kv_index=kv_index, q_segment=q_segment,
                                      kv_segment=kv_segment, chunk=_cpu_chunk(t))
        else:
            def on_cpu(q, k, v):
                return _blockwise(q, k, v, q_index=q_index, kv_index=kv_index, q_segment=q_segment,
                                  kv_segment=kv_segment, block_size=_CPU_TILE)

        return jax.lax.platform_dependent(q, k, v, cpu=on_cpu, default=dense)
    if impl == "blockwise":
        return _blockwise(q, k, v, q_index=q_index, kv_index=kv_index, q_segment=q_segment,
                          kv_segment=kv_segment, block_size=block_size)
    if impl == "cudnn":
        return _cudnn(q, k, v, visible(q_index, kv_index, q_segment, kv_segment))
    if impl in ("splash", "splash_interpret"):  # TPU kernel; the index vectors are slots 0..T-1
        return splash_attention(q, k, v, q_segment=q_segment, kv_segment=kv_segment,
                                block_size=block_size, interpret=impl == "splash_interpret")
    raise ValueError(f"attention_impl={impl!r} is not available; use 'xla', 'blockwise', "
                     "'cudnn' or 'splash'")
