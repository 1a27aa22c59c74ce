"""Keep a result written out on XLA:CPU instead of recomputed inside every consumer.

XLA:CPU fuses cheap-looking producers into each of their consumers: a cos/sin table of
[B, T, 1, hd/2] broadcast over 8 heads is then evaluated again for every element of q
and k, in the forward and in the backward, and a transpose is read with a stride inside
each elementwise fusion that uses it (a RoPE rotation fed from a transposed array took
3.2 ms against 0.3 ms from a contiguous one at 4 x 512 x 8 x 64). The usual tool,
`lax.optimization_barrier`, does not prevent this on XLA:CPU: its pipeline drops the
barrier before fusion (the compiled HLO has none left; earlier passes do respect it,
which is all `repo_jax.linear` needs of it). A conditional whose predicate is
known only at run time is kept, and nothing outside it fuses with what is inside: so
`materialized` computes its function in one, the same function in both branches (the
value does not depend on the predicate). A conditional whose branches only pass their
operands through is simplified away, so the work itself goes inside. CPU only: the
callers choose it per platform (`lax.platform_dependent`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def materialized(fn: Callable, x: jax.Array, *args):
    """fn(x, *args), its results written to memory once on XLA:CPU. `x` is a
    floating-point array: the predicate is whether its first element is NaN."""
    if x.size == 0:
        return fn(x, *args)
    # Indexed, not flattened: a flattening reshape of a sharded array gathers it.
    return lax.cond(jnp.isnan(x[(0,) * x.ndim]), fn, fn, x, *args)
