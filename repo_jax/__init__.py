"""repo-jax: OLMo-2 with RePo context re-positioning in JAX / Flax NNX.

The public names are imported on first use (PEP 562), so that importing a light
submodule (`repo_jax.host_memory`, which entry points run first) does not import JAX."""
import importlib

_EXPORTS = {
    "ConfigError": "repo_jax.config", "ModelConfig": "repo_jax.config", "layer_schemes": "repo_jax.config",
    "FormatError": "repo_jax.hf_format",
    "abstract_model": "repo_jax.loading", "load_model": "repo_jax.loading", "param_count": "repo_jax.loading",
    "KVCache": "repo_jax.model", "ModelOutput": "repo_jax.model", "Olmo2Model": "repo_jax.model",
    "init_cache": "repo_jax.model",
}

__all__ = [*_EXPORTS, "generate"]


def __getattr__(name: str):
    # `repo_jax.generate` (a callable module) is imported on first use too, so that
    # `python -m repo_jax.generate` does not find itself already imported.
    if name == "generate":
        return importlib.import_module("repo_jax.generate")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'repo_jax' has no attribute {name!r}")
