"""`repo_jax.materialize`: the result is the function's, and XLA:CPU really writes it out
instead of evaluating it again inside its consumers (checked in the compiled HLO, for the
helper and for the two places that use it: RoPE's tables and attention's gradients)."""
from __future__ import annotations

import re
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from repo_jax.attention import attend
from repo_jax.materialize import materialized
from repo_jax import rope
from repo_jax.rope import rotate


def _computations(hlo: str) -> list[tuple[str, str]]:
    """(root shape, body) of every computation in a compiled HLO module."""
    return [(m.group(1), m.group(2)) for m in re.finditer(
        r"^%[\w.\-]+ \(.*?\) -> (\S+) \{\n(.*?)\n\}", hlo, re.M | re.S)]


def _shapes_computing(hlo: str, op: str) -> set[str]:
    """Root shapes (dims only) of the computations that contain `op`."""
    return {re.sub(r"\{.*", "", shape) for shape, body in _computations(hlo) if f" {op}(" in body}


def _plain(fn, x, *args):
    return fn(x, *args)


class MaterializedTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("finite", 1.0), ("nan_first", np.nan))
    def test_result_is_the_function_s(self, first):
        """Both branches of the conditional (chosen by the first element) give fn's value."""
        x = jnp.arange(12.0).reshape(3, 4).at[0, 0].set(first)
        y = jnp.arange(4.0)
        got = self.variant(lambda x, y: materialized(lambda a, b: (a * b, jnp.cos(b)), x, y))(x, y)
        chex.assert_trees_all_close(got, (x * y, jnp.cos(y)))
        chex.assert_shape(got[0], (3, 4))

    def test_table_is_not_recomputed_per_element(self):
        """A cosine table broadcast over 8 columns: fused, the cosine is evaluated in the
        [T, 8] consumer; materialized, only in a computation of the table's shape."""
        x, a = jnp.ones((16, 8)), jnp.ones((16, 1))  # arguments: constants would fold away

        def hlo(wrap):
            f = jax.jit(lambda x, a: x * wrap(jnp.cos, a))
            return f.lower(x, a).compile().as_text()

        assert "f32[16,8]" in _shapes_computing(hlo(_plain), "cosine")  # the check sees the fused form
        assert _shapes_computing(hlo(materialized), "cosine") == {"f32[16,1]"}


class CallersTest(parameterized.TestCase):
    """Where the model uses it: CPU-compiled gradients, checked with it and without."""

    def test_rope_tables_stay_tables(self):
        """RoPE on q [B, T, H, D] with a table shared by the heads: cos/sin are computed at
        the table's shape [B, T, 1, D/2] only, in the forward and the backward (the
        polynomial's range reduction and, in the fallback branch, XLA's cosine and sine)."""
        q, positions = jnp.ones((2, 16, 4, 8)), jnp.ones((2, 16, 1))
        w = jax.random.normal(jax.random.key(0), q.shape)  # a loss with no cosine of its own

        def hlo():
            f = jax.jit(jax.grad(lambda q, p: jnp.sum(rotate(q, p, (1.0, 0.1, 0.01, 0.001), 1.0) * w),
                                 argnums=(0, 1)))
            return f.lower(q, positions).compile().as_text()

        with mock.patch("repo_jax.rope._cpu_tables", rope._tables):  # no conditional
            assert "f32[2,16,4,8]" in _shapes_computing(hlo(), "cosine")
        for op in ("cosine", "sine", "round-nearest-even"):
            assert _shapes_computing(hlo(), op) == {"f32[2,16,1,4]"}, op

    def test_attention_gradients_are_written_token_major(self):
        """The causal chunks' dQ/dK/dV are transposed back to [B, T, H, D] once, not read
        through a transpose inside the RoPE backward that consumes them."""
        b, t, h, d = 1, 256, 2, 8  # two CPU tiles: the causal-chunks path
        q = jax.random.normal(jax.random.key(0), (b, t, h, d))
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32)[None, :, None], (b, t, 1))
        inv_freq = (1.0,) * (d // 2)
        index, segment = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.zeros((b, t), jnp.int32)

        def loss(q, k, v):
            q, k = rotate(q, pos, inv_freq, 1.0), rotate(k, pos, inv_freq, 1.0)
            out = attend(q, k, v, q_index=index, kv_index=index, q_segment=segment, kv_segment=segment)
            return jnp.sum(out * out)

        def rotations_reading_a_transpose():
            f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            hlo = f.lower(q, q, q).compile().as_text()
            return [body for _, body in _computations(hlo)
                    if "ROOT" in body and re.search(r"ROOT \S+ = \S+ concatenate\(", body)
                    and " transpose(" in body]

        with mock.patch("repo_jax.attention.materialized", _plain):
            assert rotations_reading_a_transpose()  # the check sees the strided form
        self.assertEqual(rotations_reading_a_transpose(), [])
