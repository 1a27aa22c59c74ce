"""Log-likelihood of continuations given contexts, batched and jitted, and the
multiple-choice rule built on it.

A request is (context ids, continuation ids). The model reads
`context + continuation[:-1]` and each continuation token is scored by the
log-probability the model gave it one step earlier. Sequences are right-padded:
with causal attention, padding after a token cannot change what it sees.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from repo_jax.eval.tasks import Example

Request = tuple[Sequence[int], Sequence[int]]
# (sum of log-probabilities, number of scored tokens) for each request
LoglikFn = Callable[[Sequence[Request]], tuple[np.ndarray, np.ndarray]]


@functools.partial(jax.jit, static_argnames="graphdef")
def _score(graphdef, state, ids, targets, weights):
    logits = nnx.merge(graphdef, state)(ids)
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.sum((picked - jax.nn.logsumexp(logits, -1)) * weights, -1)


def _bucket(length: int, max_length: int) -> int:
    """Pad lengths to powers of two (at least 16) so only a few shapes compile."""
    return min(max(16, 1 << (length - 1).bit_length()), max_length)


def loglikelihoods(model, requests: Sequence[Request], batch_size: int = 8,
                   max_length: int | None = None, desc: str = "scoring") -> tuple[np.ndarray, np.ndarray]:
    """Sum of log-probabilities of each continuation and the number of its tokens
    scored. Inputs longer than `max_length` (default: the model's
    max_position_embeddings) lose tokens from the left, the continuation last."""
    max_length = max_length or model.config.max_position_embeddings
    queries, targets = [], []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a request has an empty continuation; nothing to score")
        cont = list(continuation)[-max_length:]
        queries.append((list(context) + list(continuation)[:-1])[-max_length:])
        targets.append(cont)
    order = sorted(range(len(requests)), key=lambda i: -len(queries[i]))
    graphdef, state = nnx.split(model)
    sums = np.zeros(len(requests))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch",
                      disable=len(order) <= batch_size):
        rows = order[start:start + batch_size]
        length = _bucket(len(queries[rows[0]]), max_length)
        ids = np.zeros((batch_size, length), np.int32)
        tgt = np.zeros((batch_size, length), np.int32)
        weight = np.zeros((batch_size, length), np.float32)
        for r, i in enumerate(rows):
            q, c = queries[i], targets[i]
            ids[r, :len(q)] = q
            tgt[r, len(q) - len(c):len(q)] = c
            weight[r, len(q) - len(c):len(q)] = 1.0
        sums[rows] = np.asarray(_score(graphdef, state, ids, tgt, weight))[:len(rows)]
    return sums, np.asarray([len(t) for t in targets])


def multiple_choice(examples: Sequence[Example], encode: Callable[[str], list[int]],
                    loglik: LoglikFn) -> dict[str, float]:
    """Accuracy three ways: the choice with the highest summed log-likelihood (`acc`),
    per token (`acc_per_token`) and per character of the continuation without its
    leading space (`acc_per_char`, OLMo's `len_norm`)."""
    requests, owner = [], []
    for n, ex in enumerate(examples):
        for context, continuation in zip(ex.contexts, ex.continuations):
            requests.append((encode(context), encode(continuation)))
            owner.append(n)
    sums, counts = loglik(requests)
    chars = np.asarray([max(1, len(c) - 1) for ex in examples for c in ex.continuations])
    owner = np.asarray(owner)
    hits = {"acc": 0, "acc_per_token": 0, "acc_per_char": 0}
    for n, ex in enumerate(examples):
        rows = owner == n
        for name, score in (("acc", sums), ("acc_per_token", sums / counts),
                            ("acc_per_char", sums / chars)):
            hits[name] += int(np.argmax(score[rows]) == ex.label)
    return {name: h / len(examples) for name, h in hits.items()}
