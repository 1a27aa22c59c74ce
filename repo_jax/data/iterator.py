"""Deterministic, resumable batches, identical on every host count.

The global sample order depends only on the number of instances and the seed:
global sample g belongs to epoch e = g // n and is instance
`permutation(n, seed=(seed, e))[g % n]`. A step consumes `batch_size` samples,
laid out as [grad_accum, micro_batch, seq_len]; its position in the stream
(`samples_seen`) is saved in every checkpoint, so a resumed run reads exactly
the samples an uninterrupted one would. Each process reads only the rows its
own devices hold and the global array is assembled with
`jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import NamedSharding

from repo_jax import sharding as shd
from repo_jax.data.sources import DataError, Instances


class SampleOrder:
    def __init__(self, num_instances: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = num_instances, seed, shuffle
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._cache[epoch]

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, np.int64)
        if not self.shuffle:
            return samples % self.n
        out = np.empty_like(samples)
        epochs = samples // self.n
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[samples[sel] % self.n]
        return out


class BatchLoader:
    """Token batches [accum, micro, seq_len] starting at a global sample position."""

    def __init__(self, instances: Instances, order: SampleOrder, accum: int, micro: int,
                 sharding: NamedSharding, vocab_size: int):
        self.instances, self.order = instances, order
        self.shape = (accum, micro, instances.seq_len)
        self.sharding, self.vocab_size = sharding, vocab_size
        self.lo, self.hi = shd.process_rows(sharding, self.shape, axis=1)

    def local(self, first_sample: int) -> np.ndarray | dict[str, np.ndarray]:
        """Tokens int32 [accum, rows, seq]; with a source that masks the loss,
        {"tokens": ..., "loss_mask": float32 of the same shape}."""
        accum, micro, seq = self.shape
        samples = (first_sample + np.arange(accum)[:, None] * micro
                   + np.arange(self.lo, self.hi)[None, :]).ravel()
        indices = self.order(samples)
        tokens, mask = self.instances.read_masked(indices)
        tokens = tokens.reshape(accum, self.hi - self.lo, seq)
        bad = np.argwhere((tokens >= self.vocab_size) | (tokens < 0))
        if len(bad):
            row = int(bad[0][0] * (self.hi - self.lo) + bad[0][1])
            raise DataError(f"token id {int(tokens[tuple(bad[0])])} is outside model.vocab_size="
                            f"{self.vocab_size} in {self.instances.where(int(indices[row]))} "
                            f"(instance {int(indices[row])}); the data "
                            "was tokenized for another vocabulary or data.token_dtype is wrong")
        if mask is None:
            return tokens
        return {"tokens": tokens, "loss_mask": mask.reshape(tokens.shape)}

    def to_global(self, local: np.ndarray | dict[str, np.ndarray]) -> jax.Array | dict[str, jax.Array]:
        return jax.tree.map(lambda a: shd.global_batch(a, self.sharding, self.shape), local)


class Prefetcher:
    """Reads the next step's local batch in a thread while the current step runs."""

    def __init__(self, loader: BatchLoader, batch_size: int):
        self.loader, self.batch_size = loader, batch_size
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: tuple[int, Future] | None = None

    def get(self, first_sample: int) -> np.ndarray:
        if self.pending is not None and self.pending[0] == first_sample:
            local = self.pending[1].result()
        else:
            local = self.loader.local(first_sample)
        nxt = first_sample + self.batch_size
        self.pending = (nxt, self.pool.submit(self.loader.local, nxt))
        return local

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
