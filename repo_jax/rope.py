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


def _rotate(x32: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Rotate x [..., head_dim] (half-split layout, as `rotate_half` in HF) by float
    positions of shape x.shape[:-1] or broadcast against it ([B, T, 1]: one position per
    token; [B, T, H]: RePo's per head), with the model's frequencies and YaRN scale."""
    inv_freq, scale = inv_frequencies(cfg)
    return rotate(x, positions, tuple(float(f) for f in inv_freq), scale)


def apply_rope_qk(q: jnp.ndarray, k: jnp.ndarray, positions: jnp.ndarray,
                  cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(`apply_rope(q, ...)`, `apply_rope(k, ...)`) by the same positions, in one call: on
    XLA:CPU the two rotations share one cos/sin table and their d(position) is one sum."""
    inv_freq, scale = inv_frequencies(cfg)
    inv_freq = tuple(float(f) for f in inv_freq)
    return jax.lax.platform_dependent(
        q, k, positions.astype(jnp.float32),
        cpu=lambda q, k, p: _rotate_cpu((q, k), p, inv_freq, scale),
        default=lambda q, k, p: (_rotate_plain(q, p, inv_freq, scale), _rotate_plain(k, p, inv_freq, scale)))


def rotate(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: tuple[float, ...], scale: float) -> jnp.ndarray:
    """`apply_rope` with explicit half-width frequencies [head_dim / 2] and cos/sin scale,
    in float32; returns x's dtype. Half width: both halves of a head rotate by the same
    angles, positions[..., None] * inv_freq.

    On CPU the gradient is hand-written (`_rotate_cpu`); other platforms differentiate
    the plain rotation, chosen at lowering (`lax.platform_dependent`) as attention does."""
    positions = positions.astype(jnp.float32)
    return jax.lax.platform_dependent(x, positions, cpu=lambda x, p: _rotate_cpu((x,), p, inv_freq, scale)[0],
                                      default=lambda x, p: _rotate_plain(x, p, inv_freq, scale))


def _xla_sincos(angles: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return jnp.cos(angles), jnp.sin(angles)


def _tables(positions: jnp.ndarray, inv_freq: tuple[float, ...], scale: float, sincos=_xla_sincos):
    """cos and sin tables positions.shape + [head_dim / 2], scaled by `scale`."""
    cos, sin = sincos(positions[..., None] * jnp.asarray(inv_freq, jnp.float32))
    return cos * scale, sin * scale


def _split(value: float, parts: int, bits: int) -> tuple[float, ...]:
    """value as a sum of `parts` floats, all but the last with `bits` significant bits
    (so that their products with an integer below 2**(24 - bits) are exact in float32)."""
    out, rest = [], value
    for _ in range(parts - 1):
        m, e = math.frexp(rest)
        out.append(math.floor(m * 2 ** bits) / 2 ** bits * 2 ** e)
        rest -= out[-1]
    return (*out, float(np.float32(rest)))


# pi/2 in four float32 parts for the Cody-Waite reduction below; Cephes' single-precision
# minimax polynomials for sin and cos on [-pi/4, pi/4].
_HALF_PI = _split(math.pi / 2, 4, 8)
_SIN = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)
_COS = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)
# |angle| up to which the reduction is exact without relying on fused multiply-adds: the
# quadrant index stays below 2**16, so its products with the 8-bit parts are exact in
# float32. Beyond it (positions past 65536 at the highest frequency) the tables come
# from XLA's sin and cos.
SINCOS_LIMIT = 2.0 ** 16


def _sincos(angles: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of float32 angles with |angle| <= SINCOS_LIMIT, within 2e-7 of the exact
    values (tests/test_rope.py), from one range reduction. XLA:CPU's own sin and cos are
    not vectorised: 8.0 ms for both over RePo's [4, 512, 8, 32] table of bench_train's
    repo-heavy case against 0.6 ms for this, side by side; in the train step they were
    0.5% of the long case's op time."""
    j = jnp.round(angles * np.float32(2 / math.pi))
    r = angles
    for part in _HALF_PI:
        r = r - j * np.float32(part)
    r2 = r * r
    s = r + r * r2 * (_SIN[0] + r2 * (_SIN[1] + r2 * _SIN[2]))
    c = 1.0 - 0.5 * r2 + r2 * r2 * (_COS[0] + r2 * (_COS[1] + r2 * _COS[2]))
    # Quadrant k of the angle: (cos, sin) = (c, s), (-s, c), (-c, -s), (s, -c) for k = 0..3.
    # Two selects and two signs (jnp.select built a stacked [4, ...] array of its
    # conditions and a search over it: 2 ms of 3 for a RePo table).
    k = j.astype(jnp.int32)
    odd = (k & 1) == 1
    cos = jnp.where(odd, s, c) * jnp.where(((k + 1) & 2) == 2, -1.0, 1.0)
    sin = jnp.where(odd, c, s) * jnp.where((k & 2) == 2, -1.0, 1.0)
    return cos, sin


def _cpu_tables(positions: jnp.ndarray, inv_freq: tuple[float, ...], scale: float):
    """`_tables` by `_sincos` while every angle is in its range (XLA's sin and cos
    otherwise), decided at run time. The conditional also keeps the tables written out
    once (`repo_jax.materialize`): left to XLA:CPU's fusion, every consumer evaluated a
    cosine and a sine per element of q or k (8x the table when it is shared by 8 heads),
    in the forward and again in the backward. The angles are computed inside it from
    the positions, never an array of their own."""
    in_range = jnp.max(jnp.abs(positions)) * max(inv_freq) <= SINCOS_LIMIT
    return jax.lax.cond(in_range, lambda p: _tables(p, inv_freq, scale, _sincos),
                        lambda p: _tables(p, inv_freq, scale), positions)


def _rotate_plain(x, positions, inv_freq, scale):
    return _rotate(x.astype(jnp.float32), *_tables(positions, inv_freq, scale)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rotate_cpu(xs: tuple[jnp.ndarray, ...], positions: jnp.ndarray, inv_freq: tuple[float, ...],
                scale: float) -> tuple[jnp.ndarray, ...]:
    """`rotate` of each of `xs` (q and k) by the same positions, with one cos/sin table
    and one d(position) sum for all, and the gradient written out. RePo's positions are
    learned: the derivative of a rotation by a is the rotation by a + pi/2, so d(angle) =
    g2 * out1 - g1 * out2 needs only the rotated output. Autodiff instead saved both halves of x and
    built d(cos) and d(sin): 3% of a RePo step's op time on XLA:CPU
    (benchmarks/profile_train_step.py). CPU only: XLA:TPU fuses autodiff's version, and
    keeping the output and the cos/sin tables raised the 1B preset's compiled
    temporaries by 0.5 GiB per chip and its estimated step by 1.7% (train.py
    --compile-only), and in bfloat16 d(angle) would come from the rounded output."""
    return _rotate_fwd(xs, positions, inv_freq, scale)[0]


def _rotate_fwd(xs, positions, inv_freq, scale):
    cos, sin = _cpu_tables(positions, inv_freq, scale)
    outs = tuple(_rotate(x.astype(jnp.float32), cos, sin).astype(x.dtype) for x in xs)
    return outs, (outs, cos, sin)


def _rotate_bwd(inv_freq, scale, residuals, gs):
    outs, cos, sin = residuals
    dxs = tuple(_unrotate(g, cos, sin, out.dtype) for g, out in zip(gs, outs))
    return dxs, _position_grad(tuple(zip(gs, outs)), inv_freq, cos.shape[:-1])


def _unrotate(g, cos, sin, dtype):
    """The input gradient of a rotation: g rotated back."""
    g1, g2 = jnp.split(g.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([g1 * cos + g2 * sin, g2 * cos - g1 * sin], axis=-1).astype(dtype)


def _position_grad(grads_and_outputs, inv_freq, shape):
    """d(position) of rotations by the same positions (of `shape`), from each one's output
    gradient g and output: sum_i f_i (g2_i out1_i - g1_i out2_i), summed over them.

    Summed as g times a reversed view of the output: a slice of the output's concatenate
    is the operand that fed it, so a half-width form made the forward write the output's
    halves as arrays of their own and copy them again into the output. The sum is a
    two-operand reduction (the same product twice): XLA:CPU hands one-operand sums to a
    library kernel that reads whole arrays only, for which the reversed view was written
    out as an array and the [-f, f] factor broadcast to one (41 ms of the repo-heavy
    case's step, 14 sums); XLA's own emitter takes the two-operand form and reads g and
    the output in place (9.5 ms; benchmarks/profile_train_step.py --vs-rope). Rotations
    of one shape (q and k of a RePo layer) are summed in one reduction."""
    f = jnp.asarray(inv_freq, jnp.float32)
    prods = []
    for g, out in grads_and_outputs:
        pairs = out.astype(jnp.float32).reshape(*out.shape[:-1], 2, -1)[..., ::-1, :]  # [out2, out1]
        prods.append(g.astype(jnp.float32).reshape(pairs.shape) * pairs * jnp.stack([-f, f]))
    if len({p.shape for p in prods}) == 1:
        prods = [sum(prods[1:], prods[0])]
    return sum((_sum_to(p, shape) for p in prods[1:]), _sum_to(prods[0], shape))


def _sum_to(prod, shape):
    """[..., 2, head_dim / 2] products -> their sum over the last two dims, reduced to the
    positions' `shape` (positions broadcast against x get those dims summed)."""
    sums = jax.lax.reduce((prod, prod), (np.float32(0), np.float32(0)),
                          lambda a, b: (a[0] + b[0], a[1] + b[1]), (prod.ndim - 2, prod.ndim - 1))
    d_pos = (sums[0] + sums[1]) * 0.5  # both sums used, or XLA drops the second operand
    d_pos = jnp.sum(d_pos, axis=tuple(range(d_pos.ndim - len(shape))))
    shared = tuple(i for i, (p, n) in enumerate(zip(shape, d_pos.shape)) if p == 1 and n != 1)
    return jnp.sum(d_pos, axis=shared, keepdims=True)


_rotate_cpu.defvjp(_rotate_fwd, _rotate_bwd)

