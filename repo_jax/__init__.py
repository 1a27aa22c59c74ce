"""repo-jax: OLMo-2 with RePo context re-positioning in JAX / Flax NNX."""
from repo_jax.config import ConfigError, ModelConfig, layer_schemes
from repo_jax.hf_format import FormatError
from repo_jax.loading import abstract_model, load_model, param_count
from repo_jax.model import KVCache, ModelOutput, Olmo2Model, init_cache

__all__ = ["ConfigError", "FormatError", "ModelConfig", "layer_schemes", "Olmo2Model",
           "ModelOutput", "KVCache", "init_cache", "abstract_model", "load_model", "param_count"]
