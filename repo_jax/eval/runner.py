"""Run one evaluation task on a model and return its metrics."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from repo_jax.cli import UserError
from repo_jax.eval import niah
from repo_jax.eval.perplexity import perplexity
from repo_jax.eval.scoring import loglikelihoods, multiple_choice
from repo_jax.eval.tasks import TASKS, load_examples
from repo_jax.generate import generate

SPECIAL_TASKS = ("perplexity", "niah", "synthetic")


def make_encoder(tokenizer, vocab_size: int) -> Callable[[str], list[int]]:
    """Text -> ids without special tokens (contexts and continuations are joined
    as token lists), refusing a tokenizer whose ids the model cannot embed."""
    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if ids and max(ids) >= vocab_size:
            raise UserError(f"the tokenizer produced id {max(ids)} but the model's vocab_size is "
                            f"{vocab_size}; put the model's own tokenizer.json in the checkpoint "
                            "directory")
        return ids
    return encode


def run_multiple_choice(model, encode, name: str, limit: int | None, batch_size: int,
                        max_length: int | None) -> dict:
    examples = load_examples(name, limit)
    metrics = multiple_choice(examples, encode, lambda reqs: loglikelihoods(
        model, reqs, batch_size, max_length, desc=name))
    return {"examples": len(examples), **metrics, "olmo_metric": TASKS[name].olmo_metric}


def run_perplexity(model, encode, docs: Sequence[str], batch_size: int,
                   max_length: int | None) -> dict:
    length = max_length or min(model.config.max_position_embeddings, 2048)
    if length < 2:
        raise UserError(f"--max-length {length}: need at least 2 tokens per window")
    return perplexity(docs, encode, lambda reqs: loglikelihoods(
        model, reqs, batch_size, length, desc="perplexity"), length)


def run_niah(model, tokenizer, encode, context_lengths: Sequence[int], depths: Sequence[float],
             num_needles: int, samples: int, seed: int, batch_size: int,
             limit: int | None) -> dict:
    """Greedy answers to NIAH prompts, batched by length with left padding."""
    cells = niah.make_samples(lambda text: len(encode(text)), context_lengths, depths,
                              num_needles, samples, seed)[:limit]
    prompts = [encode(s.prompt) for s in cells]
    order = sorted(range(len(cells)), key=lambda i: len(prompts[i]))
    # 7-digit values are at most a handful of tokens; leave room for a leading space.
    max_new = max(len(encode(" " + s.value)) for s in cells) + 4
    correct = np.zeros(len(cells), bool)
    for start in tqdm(range(0, len(order), batch_size), desc="niah", unit="batch"):
        rows = order[start:start + batch_size]
        rows = rows + [rows[0]] * (batch_size - len(rows))  # constant batch shape
        # Lengths rounded up to 64 so that a few shapes compile, without doubling long prompts.
        width = -(-max(len(prompts[i]) for i in rows) // 64) * 64
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = prompts[i]
            mask[r, width - len(prompts[i]):] = 1
        out = np.asarray(generate(model, ids, max_new, attention_mask=mask))[:, width:]
        for r, i in enumerate(rows[:len(order[start:start + batch_size])]):
            new = [int(t) for t in out[r] if t != model.config.pad_token_id]
            correct[i] = niah.is_correct(cells[i], tokenizer.decode(new))
    by_cell: dict[tuple[int, float], list[bool]] = defaultdict(list)
    for sample, ok in zip(cells, correct):
        by_cell[(sample.context_length, sample.depth)].append(bool(ok))
    return {"examples": len(cells), "accuracy": float(correct.mean()),
            "cells": [{"context_length": c, "depth": d, "accuracy": float(np.mean(v)),
                       "examples": len(v)} for (c, d), v in sorted(by_cell.items())],
            "prompt_tokens": [len(prompts[i]) for i in range(len(cells))]}


def run_synthetic(model, load, checkpoint: str, train_length: int | None, examples: int,
                  seed: int | None, batch_size: int, tasks: Sequence[str]) -> dict:
    """Exact match and answer-token loss on the synthetic tasks the run was trained on;
    `load(**overrides)` reloads the weights with YaRN for the longer induction rows."""
    from repo_jax.config import SyntheticConfig
    from repo_jax.eval import synthetic

    setup = synthetic.training_setup(checkpoint)
    cfg, length = setup if setup is not None else (SyntheticConfig(), None)
    length = train_length or length
    if length is None:
        raise UserError(f"--checkpoint {checkpoint} is not a run trained on data.source=synthetic; "
                        "give --train-length (the training sequence length)")

    def yarn(factor: float):
        return load(rope_scaling_factor=factor, original_max_position_embeddings=length)

    rows = synthetic.evaluate(model, cfg, length, examples, seed, batch_size, tasks, yarn)
    return {"examples": sum(r["examples"] for r in rows),
            "accuracy": float(np.mean([r["accuracy"] for r in rows])),
            "train_length": length, "synthetic": rows}
