"""`rotate` (and its CPU path's hand-written gradient) against autodiff of the plain rotation."""
from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

import repo_jax as rj

from repo_jax.rope import (SINCOS_LIMIT, _cpu_tables, _rotate_cpu, _sincos, apply_rope, apply_rope_qk,
                           rotate)
from tests._grad_utils import assert_grads_match
from tests.conftest import SMALL


INV_FREQ = (1.0, 0.3, 0.01, 1e-4)  # half of head_dim 8


def _plain(x, positions, inv_freq, scale):
    angles = positions[..., None] * jnp.asarray(inv_freq)
    cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rotate_one_cpu(x, positions, inv_freq, scale):
    return _rotate_cpu((x,), positions, inv_freq, scale)[0]


class ApplyRopeGradTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("per_head", (2, 6, 3), 1.0, jnp.float32, 1e-5),        # RePo: a position per token and head
        ("shared", (2, 6, 1), 1.0, jnp.float32, 1e-5),          # one table for all heads
        ("rank_broadcast", (6, 1), 1.0, jnp.float32, 1e-5),     # no batch dim on the positions
        ("yarn_scale", (2, 6, 3), 1.2, jnp.float32, 1e-5),
        ("bfloat16", (2, 6, 3), 1.0, jnp.bfloat16, 1e-2),  # d(position) from the rounded output
    )
    def test_matches_autodiff(self, pos_shape, scale, dtype, tol):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 6, 3, 8)), dtype)
        positions = jnp.asarray(rng.uniform(-50, 50, pos_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

        def loss(f):
            return lambda x, p: jnp.sum(jnp.sin(f(x, p, INV_FREQ, scale).astype(jnp.float32)) * w)

        out = self.variant(lambda x, p: rotate(x, p, INV_FREQ, scale))(x, positions)
        chex.assert_shape(out, x.shape)
        chex.assert_type(out, dtype)
        want = jax.grad(loss(_plain), argnums=(0, 1))(x, positions)
        got = [*self.variant(jax.grad(loss(rotate), argnums=(0, 1)))(x, positions),
               *self.variant(jax.grad(loss(_rotate_one_cpu), argnums=(0, 1)))(x, positions)]
        assert_grads_match(got, [*want, *want], tol)


class RotateQKTest(parameterized.TestCase):
    """q and k rotated in one call (one table, one d(position) sum on the CPU)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("per_head", 3, (2, 6, 3)),   # RePo: q and k of one shape, summed in one reduction
        ("shared", 3, (2, 6, 1)),
        ("grouped_kv", 1, (2, 6, 1)),  # k with fewer heads: a sum per shape
    )
    def test_matches_autodiff(self, kv_heads, pos_shape):
        rng = np.random.default_rng(1)
        q = jnp.asarray(rng.standard_normal((2, 6, 3, 8)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((2, 6, kv_heads, 8)), jnp.float32)
        positions = jnp.asarray(rng.uniform(-50, 50, pos_shape), jnp.float32)
        wq, wk = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k))

        def loss(q, k, p, pair):
            out_q, out_k = pair(q, k, p)
            return jnp.sum(jnp.sin(out_q) * wq) + jnp.sum(jnp.cos(out_k) * wk)

        def separate(q, k, p):
            return _plain(q, p, INV_FREQ, 1.3), _plain(k, p, INV_FREQ, 1.3)

        def joint(q, k, p):
            return _rotate_cpu((q, k), p, INV_FREQ, 1.3)

        for got, want in zip(self.variant(joint)(q, k, positions), separate(q, k, positions)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        want = jax.grad(loss, argnums=(0, 1, 2))(q, k, positions, separate)
        got = self.variant(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, positions, joint)
        assert_grads_match(got, want, 1e-5)


def test_apply_rope_qk_is_apply_rope_twice():
    """The model's call: the model's frequencies and YaRN scale, values and gradients
    as two `apply_rope` calls give them."""
    cfg = rj.ModelConfig(**SMALL).replace(rope_scaling_factor=4.0)
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.standard_normal((2, 5, cfg.num_attention_heads, cfg.head_dim)), jnp.float32)
            for _ in range(2))
    positions = jnp.asarray(rng.uniform(0, 300, (2, 5, cfg.num_attention_heads)), jnp.float32)

    def loss(pair):
        return lambda q, k, p: sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(pair(q, k, p)))

    def twice(q, k, p):
        return apply_rope(q, p, cfg), apply_rope(k, p, cfg)

    def joint(q, k, p):
        return apply_rope_qk(q, k, p, cfg)

    for got, want in zip(jax.jit(joint)(q, k, positions), twice(q, k, positions)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    want = jax.grad(loss(twice), argnums=(0, 1, 2))(q, k, positions)
    assert_grads_match(jax.jit(jax.grad(loss(joint), argnums=(0, 1, 2)))(q, k, positions), want, 1e-5)


def test_repo_rotation_gradient_writes_no_half_width_arrays():
    """The compiled CPU gradient of a RePo model rotates q and k in one fused pass each:
    no half-width [B, T, H, head_dim/2] arrays and no concatenate of them at the top
    level (the half-width d(position) had XLA keep the output's halves and g's halves as
    arrays of their own and copy the halves into the output). Nor is
    d(position)'s pairing of the halves an array: a one-operand sum went to a library
    kernel that needed the reversed output and the [-f, f] factor written out whole."""
    cfg = rj.ModelConfig(**SMALL).replace(repo_start_layer=1)
    graphdef, state = nnx.split(rj.Olmo2Model(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.zeros((2, 64), jnp.int32)  # at 2 x 16 tokens XLA:CPU keeps every sum to itself
    grad = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids) ** 2)))
    entry = grad.lower(state).compile().as_text().split("\nENTRY")[1]
    h, hd = cfg.num_attention_heads, cfg.head_dim
    assert not re.findall(rf"= f32\[2,64,{h},{hd // 2}\]\S* \w+\(", entry)
    assert not re.findall(rf"= f32\[2,64,{h},{hd}\]\S* concatenate\(", entry)
    assert not re.findall(rf"= f32\[2,64,{h},2,{hd // 2}\]", entry)


class SincosTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_float64_over_its_range(self):
        rng = np.random.default_rng(0)
        for bound in (1.0, 100.0, 1e4, SINCOS_LIMIT):
            a = rng.uniform(-bound, bound, 200_000).astype(np.float32)
            a[:3] = [bound, -bound, 0.0]
            cos, sin = (np.asarray(t) for t in self.variant(_sincos)(jnp.asarray(a)))
            np.testing.assert_allclose(cos, np.cos(a.astype(np.float64)), rtol=0, atol=2e-7, err_msg=f"{bound}")
            np.testing.assert_allclose(sin, np.sin(a.astype(np.float64)), rtol=0, atol=2e-7, err_msg=f"{bound}")

    def test_is_elementwise(self):
        """One pass over the angles: no reduction or stacked [4, ...] array in the compiled
        tables (jnp.select's form: 2 of a RePo table's 3 ms on XLA:CPU)."""
        hlo = jax.jit(_sincos).lower(jnp.zeros((4, 16, 8, 32), jnp.float32)).compile().as_text()
        assert not re.findall(r" (reduce|concatenate|iota)\(", hlo)

    def test_tables_beyond_its_range_come_from_xla(self):
        """Angles past SINCOS_LIMIT (where the float32 reduction is no longer exact)
        switch the whole table to XLA's cos and sin, bit for bit; within it, the
        polynomial agrees with them."""
        tables = jax.jit(lambda p: _cpu_tables(p, (1.0, 1e-3), 1.5))
        near = jnp.asarray(np.linspace(-1e3, 1e3, 301, dtype=np.float32).reshape(7, 43))
        far = near * 4 * SINCOS_LIMIT / 1e3
        for p, check in ((near, lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=4e-7)),
                         (far, np.testing.assert_array_equal)):
            angles = p[..., None] * jnp.asarray((1.0, 1e-3), jnp.float32)
            cos, sin = tables(p)
            check(cos, 1.5 * jnp.cos(angles))
            check(sin, 1.5 * jnp.sin(angles))
