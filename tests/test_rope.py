"""`apply_rope` (and its CPU path's hand-written gradient) against autodiff of the plain rotation."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from repo_jax.rope import _apply_rope_cpu, apply_rope
from tests._grad_utils import assert_grads_match


def _plain(x, angles, scale):
    cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class ApplyRopeGradTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("per_head", (2, 6, 3, 4), 1.0, jnp.float32, 1e-5),        # RePo: an angle per token and head
        ("shared", (2, 6, 1, 4), 1.0, jnp.float32, 1e-5),          # one table for all heads
        ("rank_broadcast", (6, 1, 4), 1.0, jnp.float32, 1e-5),     # no batch dim on the table
        ("yarn_scale", (2, 6, 3, 4), 1.2, jnp.float32, 1e-5),
        ("bfloat16", (2, 6, 3, 4), 1.0, jnp.bfloat16, 1e-2),  # dθ from the rounded output
    )
    def test_matches_autodiff(self, angle_shape, scale, dtype, tol):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 6, 3, 8)), dtype)
        angles = jnp.asarray(rng.uniform(-50, 50, angle_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

        def loss(f):
            return lambda x, a: jnp.sum(jnp.sin(f(x, a, scale).astype(jnp.float32)) * w)

        out = self.variant(lambda x, a: apply_rope(x, a, scale))(x, angles)
        chex.assert_shape(out, x.shape)
        chex.assert_type(out, dtype)
        want = jax.grad(loss(_plain), argnums=(0, 1))(x, angles)
        got = [*self.variant(jax.grad(loss(apply_rope), argnums=(0, 1)))(x, angles),
               *self.variant(jax.grad(loss(_apply_rope_cpu), argnums=(0, 1)))(x, angles)]
        assert_grads_match(got, [*want, *want], tol)
