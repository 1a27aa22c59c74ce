"""Token sources and the deterministic, resumable batch iterator."""
from repo_jax.data.iterator import BatchLoader, Prefetcher, SampleOrder
from repo_jax.data.sources import DataError, Instances, NpyTokens, PackedTokens, open_sources

__all__ = ["BatchLoader", "Prefetcher", "SampleOrder", "DataError", "Instances", "NpyTokens",
           "PackedTokens", "open_sources"]
