"""repo-jax: OLMo-2 with RePo context re-positioning in JAX / Flax NNX."""
from repo_jax.config import ConfigError, ModelConfig, layer_schemes
from repo_jax.hf_format import FormatError
from repo_jax.loading import abstract_model, load_model, param_count
from repo_jax.model import KVCache, ModelOutput, Olmo2Model, init_cache

__all__ = ["ConfigError", "FormatError", "ModelConfig", "layer_schemes", "Olmo2Model",
           "ModelOutput", "KVCache", "init_cache", "abstract_model", "load_model", "param_count",
           "generate"]


def __getattr__(name: str):
    # `repo_jax.generate` (a callable module) is imported on first use, so that
    # `python -m repo_jax.generate` does not find itself already imported.
    if name == "generate":
        import importlib
        return importlib.import_module("repo_jax.generate")
    raise AttributeError(f"module 'repo_jax' has no attribute {name!r}")
