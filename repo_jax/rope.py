"""Rotary position embedding with real-valued (RePo) positions and YaRN scaling.

Everything here runs in float32: RePo positions reach thousands, where bfloat16
cannot even tell neighbouring integers apart.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from repo_jax.config import ModelConfig


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


def rope_cos_sin(positions: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin of shape positions.shape + [head_dim / 2] for float positions (any leading
    dims). Half width: both halves of a head rotate by the same angles, so a full-width
    table would only repeat them (and, for RePo's per-head tables, double the
    transcendentals and their backward pass)."""
    inv_freq, scale = inv_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [..., head_dim] (half-split layout, as `rotate_half` in HF) by half-width
    cos/sin [..., head_dim / 2] in float32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
