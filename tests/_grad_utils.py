"""Comparing a hand-written gradient with autodiff's, shared by the tests of each."""
from __future__ import annotations

import chex
import numpy as np


def assert_grads_match(got, want, tol: float) -> None:
    """Each of `got` equals its `want` in shape and dtype, and to `tol` times the largest
    magnitude of `want` (which must not be near zero: the check would then prove nothing)."""
    assert len(got) == len(want)
    for g, r in zip(got, want):
        chex.assert_equal_shape((g, r))
        chex.assert_trees_all_equal_dtypes(g, r)
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.abs(r).max() > 0.1
        np.testing.assert_allclose(g, r, atol=tol * np.abs(r).max(), rtol=0)
