"""The `xla` attention choice on CPU runs causal chunks (or, for long sequences, the tiled
kernel) for whole sequences; each must equal the dense reference (values and
gradients) to float32 round-off."""
import chex
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
