"""Scoring on the synthetic tasks (repo_jax/data/synthetic.py): exact-match accuracy
and answer-token loss per task and setting (noise ratio, table rows, length).

An answer is exactly right when the argmax at every answer position is the answer
token given the right tokens before it: the same as greedy decoding, which can
only go wrong at the first wrong token. Examples are packed into rows of one
width per setting and scored by one jitted forward per batch. Induction is
scored at 1x, 2x and 4x the training length, with integer positions as trained
and with YaRN (factor = the length multiple, over the training length) for the
RoPE and RePo layers; NoPE layers ignore YaRN.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repo_jax.config import SyntheticConfig
from repo_jax.data import synthetic as syn

# Recall is scored at each of these that fits the training length.
NOISE_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
TABLE_ROWS = (2, 4, 8, 16)
LENGTH_MULTIPLES = (1, 2, 4)


@functools.partial(jax.jit, static_argnames="graphdef")
def _score(graphdef, state, tokens, mask):
    """Per token t >= 1: (argmax at t-1 is wrong on an answer token, NLL of answer token t)."""
    logits = nnx.merge(graphdef, state)(tokens)[:, :-1]
    targets, weight = tokens[:, 1:], mask[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    nll = (jax.nn.logsumexp(logits, -1) - picked) * weight
    wrong = (jnp.argmax(logits, -1) != targets) & (weight > 0)
    return wrong, nll


def score(model, examples: Sequence[syn.Example], batch_size: int = 32) -> dict:
    """Exact-match accuracy per query (every answer token of the query argmax-right)
    and mean answer-token loss of `model` on `examples` (one row width, the longest
    example rounded up to 16, so one shape compiles per setting)."""
    width = -(-max(len(ex.tokens) for ex in examples) // 16) * 16
    graphdef, state = nnx.split(model)
    right, nll, count = [], 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)  # constant batch shape
        tokens, mask = syn.pack(chunk, width)
        wrong, token_nll = (np.asarray(a)[:real] for a in _score(graphdef, state, tokens, mask))
        for row, ex in enumerate(chunk[:real]):
            # Targets are shifted by one: answer token t is predicted at row index t - 1.
            right += [not wrong[row, a - 1:b - 1].any() for a, b in ex.spans]
        nll += float(token_nll.sum())
        count += int(mask[:real, 1:].sum())
    return {"accuracy": float(np.mean(right)), "answer_loss": nll / count,
            "examples": len(examples), "queries": len(right), "length": width}


def _examples(make, seed: int, setting: int, count: int) -> list[syn.Example]:
    # Every setting draws from its own stream of the eval seed.
    return [make(np.random.default_rng([seed, setting, i])) for i in range(count)]


def evaluate(model, cfg: SyntheticConfig, train_length: int, count: int = 256,
             seed: int | None = None, batch_size: int = 32, tasks: Sequence[str] = syn.TASKS,
             yarn_model=None) -> list[dict]:
    """One row per (task, setting). `yarn_model(factor)` gives the same weights with
    YaRN at that factor over `train_length` (None: no YaRN rows)."""
    seed = cfg.eval_seed if seed is None else seed
    rows = []
    if "recall" in tasks:
        for n, noise in enumerate(NOISE_RATIOS):
            if syn.recall_length(cfg, noise) > train_length:
                continue
            exs = _examples(lambda rng: syn.recall(rng, cfg, noise), seed, 1000 + n, count)
            rows.append({"task": "recall", "noise": noise, **score(model, exs, batch_size)})
    if "lookup" in tasks:
        for r in TABLE_ROWS:
            exs = _examples(lambda rng: syn.lookup(rng, cfg, r), seed, 2000 + r, count)
            rows.append({"task": "lookup", "rows": r, **score(model, exs, batch_size)})
    if "induction" in tasks:
        for m in LENGTH_MULTIPLES:
            length = m * train_length
            exs = _examples(lambda rng: syn.induction(rng, cfg, length), seed, 3000 + m, count)
            variants = [(False, model)]
            if yarn_model is not None and m > 1:
                variants.append((True, yarn_model(float(m))))
            for yarn, net in variants:
                rows.append({"task": "induction", "multiple": m, "yarn": yarn,
                             **score(net, exs, batch_size)})
    return rows


def training_setup(checkpoint) -> tuple[SyntheticConfig, int] | None:
    """(task config, training length) from the `config.yaml` of the training run that
    `checkpoint` (a run directory or one of its steps) belongs to, or None."""
    from pathlib import Path

    from repo_jax.config import TrainConfig

    path = Path(checkpoint).resolve()
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            cfg = TrainConfig.load(str(folder / "config.yaml"))
            if cfg.data.source == "synthetic":
                return cfg.data.synthetic, cfg.data.seq_len
    return None
