"""The `xla` attention choice on CPU runs causal chunks (or, for long sequences, the tiled
kernel) for whole sequences; each must equal the dense reference (values and
gradients) to float32 round-off."""
from unittest import mock

import chex
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_jax import attention


def _inputs(t: int, heads: int, kv_heads: int):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, t, heads, 16))
    k = jax.random.normal(keys[1], (2, t, kv_heads, 16))
    v = jax.random.normal(keys[2], (2, t, kv_heads, 16))
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    # Two packed documents in row 0, padding at the end of row 1.
    segment = jnp.stack([jnp.where(jnp.arange(t) < t // 3, 0, 1),
                         jnp.where(jnp.arange(t) < t - 20, 0, -1)]).astype(jnp.int32)
    return q, k, v, index, segment


@pytest.mark.parametrize("path", ["chunks", "tiled"])
def test_cpu_xla_choice_matches_dense_reference(path, monkeypatch):
    if path == "tiled":  # what sequences too long for the chunks' saved probabilities get
        monkeypatch.setattr(attention, "_CPU_CHUNKED_MAX", 0)
        monkeypatch.setattr(attention, "_causal_chunks", None)
    else:
        monkeypatch.setattr(attention, "_blockwise", None)
    t = 2 * attention._CPU_TILE + 40  # three chunks or tiles, the last one partial
    for heads, kv_heads in ((4, 4), (4, 2)):
        q, k, v, index, segment = _inputs(t, heads, kv_heads)

        def loss(fn, q, k, v):
            return jnp.sum(jnp.sin(fn(q, k, v)))

        def chosen(q, k, v):
            return attention.attend(q, k, v, q_index=index, kv_index=index, q_segment=segment,
                                    kv_segment=segment, impl="xla")

        def dense(q, k, v):
            return attention._xla(q, k, v, attention.visible(index, index, segment, segment))

        jaxpr = str(jax.make_jaxpr(chosen)(q, k, v))
        assert "platform_index" in jaxpr  # the per-platform choice is staged out
        out, grads = jax.jit(jax.value_and_grad(lambda *a: loss(chosen, *a), argnums=(0, 1, 2)))(q, k, v)
        ref, ref_grads = jax.jit(jax.value_and_grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(out, ref, rtol=1e-5)
        chex.assert_trees_all_close(grads, ref_grads, atol=2e-5)


class ChunksGradientTest(parameterized.TestCase):
    """The causal chunks' written-out gradient against autodiff of the same forward."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        # dK/dV from transposed copies of Q and dO (long sequences), and without them.
        ("float32", jnp.float32, 0), ("float32_no_copies", jnp.float32, 1 << 30),
        ("bfloat16", jnp.bfloat16, 0), ("bfloat16_no_copies", jnp.bfloat16, 1 << 30))
    def test_matches_autodiff(self, dtype, copy_rows_min_t):
        self.enter_context(mock.patch.object(attention, "_COPY_ROWS_MIN_T", copy_rows_min_t))
        t, chunk = 2 * attention._CPU_TILE + 40, attention._CPU_TILE  # last chunk partial
        q, k, v, index, segment = _inputs(t, 4, 2)
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        # Row 0's query 5 sees nothing (a segment no key has): the masked softmax spreads
        # it evenly over hidden keys, which must still get no gradient from it.
        q_segment = segment.at[0, 5].set(7)
        args = (index, index, q_segment, segment)

        def loss(fn, q, k, v):
            return jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))

        def written(q, k, v):
            return attention._chunked(q, k, v, *args, chunk)

        def autodiff(q, k, v):
            return attention._chunked_fwd(q, k, v, *args, chunk)[0]

        out, grads = self.variant(jax.value_and_grad(lambda *a: loss(written, *a), argnums=(0, 1, 2)))(q, k, v)
        ref, ref_grads = jax.value_and_grad(lambda *a: loss(autodiff, *a), argnums=(0, 1, 2))(q, k, v)
        chex.assert_shape(grads, (q.shape, k.shape, v.shape))
        assert [g.dtype for g in grads] == [dtype] * 3
        tol = 2e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(out, ref, rtol=tol)
        chex.assert_trees_all_close(grads, ref_grads, atol=tol, rtol=tol)
