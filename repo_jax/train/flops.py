"""Model FLOPs per token and device peak, for MFU.

Training FLOPs per token (forward + backward = 3x forward, a multiply-add = 2):

    6 * N_matmul  +  12 * L * H * head_dim * T

N_matmul counts every weight used in a matmul per token: q/k/v/o projections,
MLP gate/up/down, lm_head (or the tied embedding used as lm_head), and on RePo
layers RePo's own maps gate_map, content_map (d -> d/8) and final_map
(d/8 -> H). The embedding lookup, norms, RoPE rotations (also RePo's per-head
cos/sin) and softmax are elementwise and not counted.

Attention: QK^T and PV each cost 2 * T * head_dim per query and head; we count
all T keys (no causal halving), the convention of PaLM's MFU, and what the
reference XLA kernel computes (it masks a full T x T score matrix).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from repo_jax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    d, i, h, kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                       cfg.num_key_value_heads, cfg.head_dim)
    attn = d * h * hd * 2 + d * kv * hd * 2          # q, o and k, v
    mlp = 3 * d * i
    r = cfg.repo_hidden_size
    repo = 2 * d * r + r * h                           # gate_map, content_map, final_map
    return cfg.num_hidden_layers * (attn + mlp) + len(cfg.repo_layers) * repo + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attention)


# Dense bf16 peak FLOP/s per chip (vendor figures).
_PEAK = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
         "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12,
         "H100": 989e12, "H200": 989e12, "B200": 2250e12}


def measure_cpu_peak(n: int = 2048, min_reps: int = 3, min_seconds: float = 1.0) -> float:
    """FLOP/s of this host's best float32 [n,n] @ [n,n] matmul (all cores), over at least
    `min_reps` runs and `min_seconds`: on a shared VM the cores are slowed for stretches of
    a fraction of a second, and the old 3 back-to-back runs (0.2 s) could all fall in one,
    understating the peak by 40% (MFU over 100%)."""
    x = jnp.ones((n, n), jnp.float32, device=jax.local_devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * n ** 3 / best


def peak_flops(override_per_device: float, num_devices: int) -> tuple[float, str]:
    """(total peak FLOP/s of `num_devices` devices, how it was obtained). On CPU the fake
    devices of a host share its cores, so the total is one host's measured peak per process."""
    devices = jax.devices()
    if override_per_device > 0:
        return override_per_device * num_devices, "configured peak_flops"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measure_cpu_peak() * jax.process_count(), "measured float32 matmul on CPU"
    for name, value in _PEAK.items():
        if name.lower() in kind.lower():
            return value * num_devices, f"{kind} bf16 datasheet"
    return float("nan"), f"unknown device {kind!r}: set peak_flops"


def mfu(flops_per_step: float, seconds_per_step: float, total_peak: float) -> float:
    return float(flops_per_step / seconds_per_step / total_peak) if seconds_per_step > 0 else float("nan")
