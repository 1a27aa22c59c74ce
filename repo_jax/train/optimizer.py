"""AdamW with OLMo's parameter groups, learning-rate schedules and clipping."""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from repo_jax.config import OptimizerConfig, ScheduleConfig


def param_group(key: str) -> str:
    """'embedding', 'norm' or 'matrix' for a dotted parameter path."""
    parts = key.split(".")
    if parts[0] == "embed_tokens":
        return "embedding"
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2].endswith("norm"):
        return "norm"
    return "matrix"


def decay_mask(keys, cfg: OptimizerConfig) -> dict[str, bool]:
    """Which parameters get weight decay: matrices always (lm_head and RePo maps
    included), norms and embeddings as configured (the RePo 1B recipe decays norms
    but not embeddings)."""
    wanted = {"matrix": True, "norm": cfg.decay_norms, "embedding": cfg.decay_embeddings}
    return {k: wanted[param_group(k)] for k in keys}


def schedule(cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> optax.Schedule:
    """lr at update `count` (0 = first update): linear warmup from 0 over `warmup_steps`,
    then `kind` from peak_lr to final_fraction * peak_lr at `decay_steps` (default: the
    run's steps), flat after that."""
    warm = cfg.warmup_steps
    end = cfg.decay_steps or total_steps
    final = peak_lr * cfg.final_fraction
    span = max(end - warm, 1)

    def lr(count):
        step = jnp.asarray(count, jnp.float32)
        warmup = peak_lr * (step + 1) / max(warm, 1)
        frac = jnp.clip((step - warm) / span, 0.0, 1.0)
        if cfg.kind == "linear":
            after = peak_lr + (final - peak_lr) * frac
        elif cfg.kind == "cosine":
            after = final + (peak_lr - final) * 0.5 * (1 + jnp.cos(math.pi * frac))
        else:
            after = jnp.full_like(frac, peak_lr)
        return jnp.where(step < warm, warmup, after)

    return lr


def make_optimizer(cfg: OptimizerConfig, sched: optax.Schedule, keys) -> optax.GradientTransformation:
    adamw = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask(keys, cfg))
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
