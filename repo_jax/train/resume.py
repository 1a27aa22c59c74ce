"""Resume from the newest checkpoint step that verifies, under the config it was trained with."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from repo_jax import params_io
from repo_jax.checkpoint import Checkpointer, all_finite
from repo_jax.config import ConfigError, TrainConfig
from repo_jax.step_integrity import BadStep
from repo_jax.train.state import TrainState

# How the model computes, not what it is: free to change on resume.
_COMPUTE_FIELDS = {"dtype", "attention_impl", "attention_block_size", "remat"}


def step_facts(cfg: TrainConfig) -> dict[str, Any]:
    """What each step's repo_jax.json records beyond the model config, for `changed_fields`."""
    return {"optimizer": {"clip_norm": cfg.optimizer.clip_norm}}


def changed_fields(step_dir: Path, cfg: TrainConfig) -> list[str]:
    """'key: saved -> now' for each model field, and each optimizer field that changes the
    optimizer state's structure (clipping on/off), where `cfg` differs from the step's."""
    saved, meta = params_io.read_meta(step_dir)
    now = cfg.model
    out = [f"model.{f.name}: {_show(getattr(saved, f.name))} -> {_show(getattr(now, f.name))}"
           for f in dataclasses.fields(now)
           if f.name not in _COMPUTE_FIELDS and getattr(saved, f.name) != getattr(now, f.name)]
    clip = meta.get("optimizer", {}).get("clip_norm")
    if clip is not None and (clip > 0) != (cfg.optimizer.clip_norm > 0):
        out.append(f"optimizer.clip_norm: {clip} -> {cfg.optimizer.clip_norm} (turns clipping "
                   f"{'off' if clip > 0 else 'on'})")
    return out


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def restore_newest_good(ckpt: Checkpointer, cfg: TrainConfig, abstract: TrainState,
                        log: Callable[[str], None]) -> tuple[TrainState, dict[str, Any]] | None:
    """Restore the newest step that verifies and holds finite values (moving each bad one
    aside, with one line saying why); None when there is none. A step trained under
    another config is refused (ConfigError) unless cfg.resume_with_changed_config."""
    while (step := ckpt.newest_verified(log)) is not None:
        step_dir = ckpt.directory / str(step)
        changed = changed_fields(step_dir, cfg)
        if changed and not cfg.resume_with_changed_config:
            raise ConfigError(f"{step_dir} was trained under another config: {'; '.join(changed)}; "
                              "resume with the config it was written with (run_dir/config.yaml), "
                              "use a new run_dir, or set resume_with_changed_config=true")
        if changed:
            log(f"resuming step {step} under a changed config (resume_with_changed_config=true): "
                f"{'; '.join(changed)}")
        state, meta = ckpt.restore(step, abstract)
        if all_finite((state.params, state.opt_state)):
            return state, meta
        ckpt.set_aside(step, BadStep("nonfinite", "its parameters or optimizer state hold NaN "
                                                  "or Inf"), log)
    return None
