"""The repo-jax model checkpoint: Orbax parameters plus the model config.

Layout of a model directory (written by `convert import`, read by `load_model`,
`init_from=` in training and `convert export`):

    DIR/repo_jax.json   {"format": "repo-jax-model", "version": 1,
                         "model_config": {...ModelConfig fields...},
                         "metadata": {"source", "source_format", "dtype",
                                      "repo_layers", "scan_layers", ...}}
    DIR/params/         Orbax (StandardCheckpointer) flat dict:
                        "layers.3.self_attn.q_proj.kernel" -> array ([in, out])

Keys are the dotted NNX parameter paths, so the parameter tree is the same for
scanned and unscanned execution; `scan_layers` is recorded for information only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from repo_jax.config import ConfigError, ModelConfig
from repo_jax.hf_format import FormatError

FORMAT = "repo-jax-model"
META_FILE = "repo_jax.json"
PARAMS_DIR = "params"


def path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, Any]:
    """Dotted parameter path -> array (or ShapeDtypeStruct for an abstract model)."""
    return {path_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def is_model_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / META_FILE).exists()


def resolve_model_dir(path: str | os.PathLike) -> Path | None:
    """`path` itself if it is a model directory; for a training run directory
    (`run_dir/checkpoints/<step>/`, each finished step a model directory) the
    latest finished step; else None."""
    path = Path(path)
    if is_model_dir(path):
        return path
    for root in (path / "checkpoints", path):
        steps = [d for d in root.glob("*") if d.name.isdigit() and is_model_dir(d)] if root.is_dir() else []
        if steps:
            return max(steps, key=lambda d: int(d.name))
    return None


def write_meta(directory: str | os.PathLike, cfg: ModelConfig, metadata: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": 1, "model_config": cfg.to_dict(),
            "metadata": {"repo_layers": list(cfg.repo_layers), "scan_layers": False, **metadata}}
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and metadata of a model directory."""
    f = Path(directory) / META_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise FormatError(f"{f}: not found; {directory} is not a repo-jax model directory "
                          "(make one with `python -m convert import`)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{f}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise FormatError(f"{f}: format={meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise FormatError(f"{f}: bad model_config ({e})") from None
    recorded = meta.get("metadata", {}).get("repo_layers")
    if recorded is not None and tuple(recorded) != cfg.repo_layers:
        raise FormatError(f"{f}: metadata says RePo layers {recorded} but model_config has "
                          f"{list(cfg.repo_layers)}; the file was edited inconsistently")
    return cfg, meta.get("metadata", {})


def save_params(directory: str | os.PathLike, params: dict[str, Any]) -> None:
    """Write a flat parameter dict to DIR/params (blocking)."""
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(Path(directory).absolute() / PARAMS_DIR, params)
    ckpt.wait_until_finished()


def saved_shapes(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the saved parameters, read from metadata only."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata(Path(directory).absolute() / PARAMS_DIR).item_metadata.tree
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tree.items()}


def restore_params(directory: str | os.PathLike, target: dict[str, Any],
                   allow_missing: bool = False) -> dict[str, jax.Array]:
    """Restore the keys of `target` (ShapeDtypeStructs, optionally with `.sharding`, so
    each host reads only its shards). Keys and shapes must match the checkpoint; dtypes
    are cast to the target's. With `allow_missing`, target keys the checkpoint lacks
    (e.g. RePo maps when starting from plain OLMo-2) are left out of the result."""
    import orbax.checkpoint as ocp

    saved = saved_shapes(directory)
    missing = sorted(set(target) - set(saved))
    extra = sorted(set(saved) - set(target))
    if allow_missing:
        target = {k: v for k, v in target.items() if k in saved}
        missing = []
    if missing or extra:
        raise FormatError(f"{directory}: parameters do not match the model: missing "
                          f"{missing[:5]}, unexpected {extra[:5]}; use the config the checkpoint "
                          "was written with")
    for k, t in target.items():
        if saved[k][0] != tuple(t.shape):
            raise FormatError(f"{directory}: parameter {k!r} has shape {saved[k][0]}, the model "
                              f"expects {tuple(t.shape)}")
    # A target without a sharding goes to this process's first device: the shardings
    # recorded in the checkpoint name the devices of the run that wrote it (e.g. a
    # multi-host training job), which need not exist here.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {k: t if getattr(t, "sharding", None) is not None
              else jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=local) for k, t in target.items()}
    ckpt = ocp.StandardCheckpointer()
    return ckpt.restore(Path(directory).absolute() / PARAMS_DIR, target)


def load_model_dir(directory: str | os.PathLike, dtype: str | None = None, **overrides) -> nnx.Module:
    """Build the model of a repo-jax model directory with its saved parameters."""
    from repo_jax.loading import abstract_model

    cfg, _ = read_meta(directory)
    if dtype is not None:
        overrides = {"param_dtype": dtype, "dtype": dtype, **overrides}
    cfg = cfg.replace(**overrides) if overrides else cfg
    model = abstract_model(cfg)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_params(model).items()}
    values = restore_params(directory, target)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        var.set_value(values[path_key(path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
