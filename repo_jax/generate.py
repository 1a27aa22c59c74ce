"""Autoregressive generation with a preallocated KV cache.

A prefill runs the prompt through the model once and fills the cache; then each
new token costs one forward of length 1 that reads the cache. On RePo layers the
new token's positions come from its own hidden state, its q and k are rotated
by them and the rotated k (and v) appended to the cache. Prefill and the whole
decode loop (`jax.lax.while_loop`) are one jitted function of (graphdef, state),
so nothing is recompiled per step and Python is not in the loop.

    python -m repo_jax.generate --checkpoint DIR --prompt TEXT [--max-new-tokens N]
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import types
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repo_jax.cli import UserError, add_model_arguments, encode, load_from_args, run
from repo_jax.model import Olmo2Model, init_cache


def _pick(logits: jnp.ndarray, key: jax.Array, temperature, top_p, greedy: bool) -> jnp.ndarray:
    """Next token [B] from logits [B, V]: argmax, or a sample from the smallest set of
    tokens whose probability reaches `top_p` (nucleus), at `temperature`."""
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    ranked = jnp.sort(logits, -1)[:, ::-1]
    probs = jax.nn.softmax(ranked, -1)
    # A token stays if the mass ranked above it is still short of top_p (the top one always).
    keep = jnp.sum(jnp.cumsum(probs, -1) - probs < top_p, -1)
    threshold = jnp.take_along_axis(ranked, keep[:, None] - 1, -1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _generate(graphdef, state, input_ids, attention_mask, key, temperature, top_p, eos_id,
              pad_id, *, max_new_tokens: int, greedy: bool):
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    # The last sampled token is never fed back, hence the -1.
    cache = init_cache(model.config, b, t + max_new_tokens - 1)
    # Left padding: each row counts positions from its own first real token.
    positions = jnp.maximum(jnp.cumsum(attention_mask, 1) - 1, 0)
    out = model.forward(input_ids, position_ids=positions, attention_mask=attention_mask,
                        cache=cache, logits_to_keep=1)
    key, sub = jax.random.split(key)
    first = _pick(out.logits[:, -1], sub, temperature, top_p, greedy)
    done = first == eos_id
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    # Position of the next token fed: the number of real tokens so far.
    init = (jnp.int32(1), tokens, out.cache, first, done, key, jnp.sum(attention_mask, 1))

    def not_finished(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(carry):
        step, tokens, cache, last, done, key, pos = carry
        out = model.forward(last[:, None], position_ids=pos[:, None],
                            attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache)
        key, sub = jax.random.split(key)
        nxt = _pick(out.logits[:, -1], sub, temperature, top_p, greedy)
        shown = jnp.where(done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, shown[:, None], (0, step))
        # Finished rows keep feeding their (in-vocabulary) samples, not the pad id,
        # which may lie outside the embedding table.
        return step + 1, tokens, out.cache, nxt, done | (nxt == eos_id), key, pos + 1

    tokens = jax.lax.while_loop(not_finished, decode_step, init)[1]
    return jnp.concatenate([input_ids, tokens], 1)


def generate(model: Olmo2Model, input_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             attention_mask=None) -> jnp.ndarray:
    """Continue int32 prompts [B, T] by `max_new_tokens`; returns int32 [B, T + max_new_tokens].

    `temperature=0` is greedy. `eos_id` defaults to the model config's `eos_token_id`
    (pass -1 to never stop); a row stops at its EOS and is filled with the config's
    `pad_token_id` after it. Prompts of different lengths are left-padded with
    `attention_mask` (1 = token, 0 = padding).
    """
    cfg = model.config
    input_ids = np.asarray(input_ids)
    chex.assert_rank(input_ids, 2)
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty; give at least one prompt token")
    if input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size:
        raise ValueError(f"input_ids hold ids outside [0, {cfg.vocab_size}) (vocab_size)")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    chex.assert_equal_shape([input_ids, mask])
    if not mask[:, -1].all():
        raise ValueError("attention_mask: pad prompts on the left (the last column must be 1)")
    if max_new_tokens == 0:
        return jnp.asarray(input_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(input_ids, jnp.int32),
                     jnp.asarray(mask, jnp.int32), jax.random.key(seed),
                     jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                     jnp.int32(cfg.eos_token_id if eos_id is None else eos_id),
                     jnp.int32(cfg.pad_token_id), max_new_tokens=max_new_tokens,
                     greedy=temperature == 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repo_jax.generate", description=(
        "Continue a prompt with a checkpoint (Hugging Face, repo-jax model or training "
        "run directory), using its tokenizer.json or the dolma2 default."))
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not (0 <= args.temperature < math.inf) or not 0 < args.top_p <= 1:
        raise UserError(f"--temperature {args.temperature} / --top-p {args.top_p}: need "
                        "temperature >= 0 and 0 < top-p <= 1")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    model, tokenizer = load_from_args(args)
    ids = encode(tokenizer, args.prompt, model.config.vocab_size, "--prompt")
    cfg = model.config
    context = int(cfg.max_position_embeddings * cfg.rope_scaling_factor)
    if len(ids) + args.max_new_tokens > context:
        # The KV cache is allocated for the whole output up front.
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: with the {len(ids)}-token "
                        f"prompt that exceeds the model's context of {context} tokens; ask for "
                        "fewer or extend the context with --rope-scaling-factor")
    out = np.asarray(generate(model, np.asarray([ids]), args.max_new_tokens, args.temperature,
                              args.top_p, seed=args.seed))[0, len(ids):]
    eos = np.flatnonzero(out == model.config.eos_token_id)
    print(args.prompt + tokenizer.decode([int(i) for i in out[:eos[0] if eos.size else None]]))
    return 0


class _CallableModule(types.ModuleType):
    """The public API is `repo_jax.generate(model, ...)` and the command line is
    `python -m repo_jax.generate`: one name for both, so calling this module calls
    `generate`."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(run(main))
