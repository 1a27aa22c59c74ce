"""The model's linear layer, and the weight gradient XLA:CPU needs for it.

The weight gradient of `y = x @ w` (x [N, d_in]) is `x^T @ g`, a dot that contracts the
row dimension of both operands. XLA:CPU hands that form to its Eigen dot, not to the
YNNPACK kernels that run every other matmul of the step (all 57 weight gradients of
bench_train's transformer case were `dot(..., lhs_contracting_dims={0})` in the compiled
step), and Eigen runs it at about half the rate: the vocabulary projection's gradient
took 209 ms against 101 ms from a copied x^T, and 0.60-0.84x for the model's other
shapes (`python -m benchmarks.bench_weight_grad_cpu`, side by side per shape, with
PyTorch's for scale). So on the CPU the gradient is taken from a copy of x^T in its own
[d_in, N] array, one pass over x.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx
from jax import lax

# (lhs contracting, rhs contracting), (lhs batch, rhs batch): [N, d_in] x [d_in, d_out].
_MATMUL = (((1,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_copied_grad(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    return lax.dot_general(x, w, _MATMUL, precision=precision)


def _matmul_fwd(x, w, precision):
    return _matmul_copied_grad(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, g):
    x, w = residuals
    dx = lax.dot_general(g, w, (((1,), (1,)), ((), ())), precision=precision)
    # The barrier keeps XLA from folding the transpose back into the dot's dimension
    # numbers, which would bring back the slow transposed-operand kernel.
    x_t = lax.optimization_barrier(x.T)
    dw = lax.dot_general(x_t, g, _MATMUL, precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_copied_grad.defvjp(_matmul_fwd, _matmul_bwd)


def copied_grad_dot_general(lhs, rhs, dimension_numbers, precision=None,
                            preferred_element_type=None, *, out_sharding=None):
    """`lax.dot_general` for `nnx.Linear(dot_general=...)`: the same product, whose weight
    gradient on XLA:CPU is computed from a copied x^T (module docstring). Other platforms
    keep autodiff's gradient, chosen at lowering as `repo_jax.rope.apply_rope` does:
    XLA:TPU picks its own layouts, and the copy would only add memory."""
    plain = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                              preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    if (dimension_numbers != _MATMUL or preferred_element_type is not None
            or out_sharding is not None or lhs.ndim != 2):
        return plain(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=lambda x, w: _matmul_copied_grad(x, w, precision),
                                  default=lambda x, w: plain(x, w))


class FlatLinear(nnx.Linear):
    """nnx.Linear (same parameters) applied to its input reshaped to 2-D [B*T, d_in], with
    `copied_grad_dot_general` unless told otherwise. On XLA:CPU the weight gradient of a
    [B, T, d] x [d, out] dot costs a transposed copy of the [B*T, out] gradient and a
    slower dot kernel (the profile of the train step had these copies among its largest
    ops); on a 2-D input it is one plain dot. The reshape is free on every backend and
    keeps the batch dimension major, so its sharding holds."""

    def __init__(self, *args, dot_general=copied_grad_dot_general, **kwargs):
        super().__init__(*args, dot_general=dot_general, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])
