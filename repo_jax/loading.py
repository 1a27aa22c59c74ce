"""Build models: fresh, abstract, or filled from Hugging Face style weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repo_jax.config import ModelConfig
from repo_jax.hf_format import FormatError, hf_to_path, path_to_hf
from repo_jax.model import Olmo2Model
from repo_jax.sources import open_source


def abstract_model(cfg: ModelConfig, **kwargs) -> Olmo2Model:
    """The model with ShapeDtypeStruct leaves: nothing allocated."""
    return nnx.eval_shape(lambda: Olmo2Model(cfg, rngs=nnx.Rngs(0), **kwargs))


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, counted without allocating them."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def model_from_tensors(cfg: ModelConfig, names: Iterable[str],
                       read: Callable[[str], np.ndarray], source: str,
                       scan_layers: bool = False) -> Olmo2Model:
    """Fill a model from HF-named tensors, one at a time. Every parameter must be
    given exactly once with the right shape; extra or missing names are refused."""
    model = abstract_model(cfg, scan_layers=scan_layers)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    seen: set[tuple] = set()
    for name in names:
        try:
            path, transpose = hf_to_path(name)
        except FormatError as e:
            raise FormatError(f"{source}: {e}; remove it or use the matching model config") from None
        if path not in flat:
            raise FormatError(f"{source}: unexpected tensor {name!r} for this model config "
                              f"({cfg.num_hidden_layers} layers, RePo on {list(cfg.repo_layers)})")
        var = flat[path]
        array = np.asarray(read(name))
        if transpose:
            array = array.T
        if array.shape != tuple(var.shape):
            got, want = (array.shape[::-1], var.shape[::-1]) if transpose else (array.shape, var.shape)
            raise FormatError(f"{source}: tensor {name!r} has shape {tuple(got)}, expected "
                              f"{tuple(want)} from the config; the weights and config disagree")
        if not np.all(np.isfinite(array.astype(np.float32))):
            raise FormatError(f"{source}: tensor {name!r} contains NaN or Inf; the checkpoint is "
                              "damaged")
        var.set_value(jnp.asarray(array, dtype=var.dtype))
        seen.add(path)
    missing = [p for p in flat if p not in seen]
    if missing:
        names_missing = [path_to_hf(p)[0] for p in missing[:5]]
        raise FormatError(f"{source}: missing tensor(s) {names_missing}"
                          f"{' and more' if len(missing) > 5 else ''}; the checkpoint is incomplete "
                          "or does not match its config")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_checkpoint(path: str | os.PathLike, dtype: str = "float32", **overrides) -> Olmo2Model:
    """A Hugging Face directory (config.json + safetensors or pytorch_model.bin, single
    or sharded) or an OLMo training checkpoint (config.yaml + model.safetensors/.pt)."""
    source = open_source(path, param_dtype=dtype, dtype=dtype, **overrides)
    return model_from_tensors(source.config, source.names, source.read, str(path))


def load_model(path: str | os.PathLike, dtype: str = "float32", **overrides) -> Olmo2Model:
    """Load a model from a Hugging Face directory, an OLMo training checkpoint
    directory, a repo-jax model directory (repo_jax.json + Orbax params) or a training
    run directory (its latest checkpoint). `dtype` sets both parameter and compute
    dtype; `overrides` change other `ModelConfig` fields (e.g. attention_impl)."""
    from repo_jax import params_io

    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory; point at a checkpoint directory")
    model_dir = params_io.resolve_model_dir(path)
    if model_dir is not None:
        return params_io.load_model_dir(model_dir, dtype, **overrides)
    return load_checkpoint(path, dtype, **overrides)


def iter_hf_tensors(model: Olmo2Model) -> Iterable[tuple[str, np.ndarray]]:
    """(HF name, numpy array in torch layout) for every parameter, one at a time."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = path_to_hf(path)
        array = np.asarray(jax.device_get(var.get_value()))
        yield name, array.T if transpose else array
