"""Rotary position embedding with real-valued (RePo) positions and YaRN scaling.

Everything here runs in float32: RePo positions reach thousands, where bfloat16
cannot even tell neighbouring integers apart.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from repo_jax.config import ModelConfig
from repo_jax.materialize import materialized


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale (1.0 without YaRN).

    YaRN follows the paper (and `transformers`' `_compute_yarn_parameters` with
    `truncate=True`): low frequencies are interpolated by `rope_scaling_factor`,
    high ones kept, with a linear ramp between the correction dims.
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation = 1.0 / pos_freqs
    factor = cfg.rope_scaling_factor
    if factor == 1.0:
        return extrapolation.astype(np.float32), 1.0

    def correction_dim(rotations: float) -> float:
        orig = cfg.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # weight of the unscaled (extrapolated) frequency
    inv_freq = extrapolation / factor * (1.0 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), 0.1 * math.log(factor) + 1.0


def rope_angles(positions: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, float]:
    """Angles positions.shape + [head_dim / 2] for float positions (any leading dims), and
    the cos/sin scale. Half width: both halves of a head rotate by the same angles."""
    inv_freq, scale = inv_frequencies(cfg)
    return positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq), scale


def _rotate(x32: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray, scale: float) -> jnp.ndarray:
    """Rotate x [..., head_dim] (half-split layout, as `rotate_half` in HF) by half-width
    angles [..., head_dim / 2] (broadcast against x's leading dims), cos/sin scaled by
    `scale`, in float32; returns x's dtype.

    On CPU the gradient is hand-written (`_apply_rope_cpu`); other platforms differentiate
    the plain rotation, chosen at lowering (`lax.platform_dependent`) as attention does."""
    return jax.lax.platform_dependent(x, angles, cpu=lambda x, a: _apply_rope_cpu(x, a, scale),
                                      default=lambda x, a: _rotate_by(x, a, scale))


def _rotate_by(x: jnp.ndarray, angles: jnp.ndarray, scale: float) -> jnp.ndarray:
    return _rotate(x.astype(jnp.float32), jnp.cos(angles) * scale, jnp.sin(angles) * scale).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _apply_rope_cpu(x: jnp.ndarray, angles: jnp.ndarray, scale: float) -> jnp.ndarray:
    """`apply_rope` with its gradient written out. RePo's angles are learned: the
    derivative of a rotation by a is the rotation by a + pi/2, so d(angle) = g2 * out1 -
    g1 * out2 needs only the rotated output. Autodiff instead saved both halves of x and
    built d(cos) and d(sin): 3% of a RePo step's op time on XLA:CPU
    (benchmarks/profile_train_step.py). CPU only: XLA:TPU fuses autodiff's version, and
    keeping the output and the cos/sin tables raised the 1B preset's compiled
    temporaries by 0.5 GiB per chip and its estimated step by 1.7% (train.py
    --compile-only), and in bfloat16 d(angle) would come from the rounded output."""
    return _apply_rope_fwd(x, angles, scale)[0]


def _cpu_tables(angles: jnp.ndarray, scale: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables written out once: left to XLA:CPU's fusion, every consumer
    evaluated a cosine and a sine per element of q or k (8x the table when it is shared
    by 8 heads), in the forward and again in the backward (`repo_jax.materialize`)."""
    return materialized(lambda a: (jnp.cos(a) * scale, jnp.sin(a) * scale), angles)


def _apply_rope_fwd(x, angles, scale):
    cos, sin = _cpu_tables(angles, scale)
    out = _rotate(x.astype(jnp.float32), cos, sin).astype(x.dtype)
    return out, (out, cos, sin)


def _apply_rope_bwd(scale, residuals, g):
    out, cos, sin = residuals
    g1, g2 = jnp.split(g.astype(jnp.float32), 2, axis=-1)
    o1, o2 = jnp.split(out.astype(jnp.float32), 2, axis=-1)
    dx = jnp.concatenate([g1 * cos + g2 * sin, g2 * cos - g1 * sin], axis=-1).astype(out.dtype)
    d_angles = g2 * o1 - g1 * o2
    # Angles broadcast against x (one table for all heads) get those dims summed.
    d_angles = jnp.sum(d_angles, axis=tuple(range(d_angles.ndim - cos.ndim)))
    shared = tuple(i for i, (a, n) in enumerate(zip(cos.shape, d_angles.shape)) if a == 1 and n != 1)
    return dx, jnp.sum(d_angles, axis=shared, keepdims=True)


_apply_rope_cpu.defvjp(_apply_rope_fwd, _apply_rope_bwd)
