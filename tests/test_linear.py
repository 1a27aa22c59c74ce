"""`repo_jax.linear`: the CPU weight gradient from a copied x^T is autodiff's gradient,
and the compiled step really takes the copy (a plain dot, not the transposed-operand one)."""
from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from repo_jax.linear import FlatLinear, _matmul_copied_grad, copied_grad_dot_general
from tests._grad_utils import assert_grads_match

_MATMUL = (((1,), (0,)), ((), ()))


def _weight_grad_dots(hlo: str) -> list[str]:
    """The lhs contracting dims of every dot in the compiled module (fusion bodies too)."""
    return re.findall(r" dot\([^)]*\), lhs_contracting_dims=\{(\d+)\}", hlo)


class CopiedGradTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("wide", 24, 8, 40, jnp.float32, 1e-5),     # d -> V, as the vocabulary projection
        ("narrow", 24, 40, 5, jnp.float32, 1e-5),   # d -> d/8, as RePo's gate/content maps
        ("bfloat16", 24, 16, 16, jnp.bfloat16, 2e-2),
    )
    def test_matches_autodiff(self, n, d_in, d_out, dtype, tol):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, d_in)), dtype)
        w = jnp.asarray(rng.standard_normal((d_in, d_out)), dtype)
        c = jnp.asarray(rng.standard_normal((n, d_out)), jnp.float32)

        def loss(dot):
            return lambda x, w: jnp.sum(jnp.sin(dot(x, w, _MATMUL).astype(jnp.float32)) * c)

        out = self.variant(lambda x, w: copied_grad_dot_general(x, w, _MATMUL))(x, w)
        chex.assert_shape(out, (n, d_out))
        chex.assert_type(out, dtype)
        want = jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, w)
        cpu_path = lambda x, w, dn: _matmul_copied_grad(x, w, None)  # noqa: E731
        got = [*self.variant(jax.grad(loss(copied_grad_dot_general), argnums=(0, 1)))(x, w),
               *self.variant(jax.grad(loss(cpu_path), argnums=(0, 1)))(x, w)]
        assert_grads_match(got, [*want, *want], tol)

    def test_compiled_gradient_takes_the_copy(self):
        """On XLA:CPU the weight gradient is a dot contracting the copy's minor dim; plain
        autodiff's contracts dim 0 of x (the kernel XLA:CPU runs at half the rate)."""
        x, w = jnp.ones((64, 32)), jnp.ones((32, 48))  # arguments: constants would fold away

        def hlo(dot):
            grad = jax.jit(jax.grad(lambda w, x: jnp.sum(dot(x, w, _MATMUL) ** 2)))
            return grad.lower(w, x).compile().as_text()

        assert "0" in _weight_grad_dots(hlo(jax.lax.dot_general))  # the check can see the slow form
        # Both the dispatching entry point and its CPU branch on its own, where nothing
        # but the barrier keeps XLA from folding the transpose back into the dot.
        cpu_path = lambda x, w, dn: _matmul_copied_grad(x, w, None)  # noqa: E731
        for dot in (copied_grad_dot_general, cpu_path):
            dims = _weight_grad_dots(hlo(dot))
            assert dims and "0" not in dims, dims

    def test_flat_linear_uses_it_and_other_shapes_fall_back(self):
        layer = FlatLinear(6, 4, use_bias=False, rngs=nnx.Rngs(0))
        assert layer.dot_general is copied_grad_dot_general
        assert [path for path, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))] == [("kernel",)]
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 6)), jnp.float32)
        kernel = layer.kernel[...]
        np.testing.assert_allclose(layer(x), x @ kernel, rtol=1e-6, atol=1e-6)
        # A 3-D operand or a batched product is not the [N, d_in] x [d_in, d_out] form: plain dot.
        batched = (((2,), (1,)), ((0,), (0,)))
        y = jnp.ones((2, 6, 5))
        np.testing.assert_allclose(copied_grad_dot_general(x, y, batched),
                                   jax.lax.dot_general(x, y, batched))
        jaxpr = str(jax.make_jaxpr(lambda a, b: copied_grad_dot_general(a, b, batched))(x, y))
        assert "platform_index" not in jaxpr and "custom_vjp" not in jaxpr
