"""Greedy decoding speed: the KV cache (`repo_jax.generate`) against recomputing
the whole prefix for every new token, side by side, with the ratio.

The recompute baseline is a jitted full forward over the prefix (rounded up to a
multiple of 16 so that only a few shapes compile; causal attention makes the
extra slots irrelevant) that computes logits for its last 16 positions only and
takes those of the last real token. Both are
compiled before timing and both must produce the same tokens.

    python -m benchmarks.bench_decode [--preset tiny-repo --prompt 128 --new 128 --batch 1]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import repo_jax as rj

BUCKET = 16


def recompute_prefix(forward, state, prompt: np.ndarray, new: int) -> np.ndarray:
    b, t = prompt.shape
    width = -(-(t + new) // BUCKET) * BUCKET
    ids = np.zeros((b, width), np.int32)
    ids[:, :t] = prompt
    for cur in range(t, t + new):
        bucket = -(-cur // BUCKET) * BUCKET
        logits = forward(state, ids[:, :bucket])  # the last BUCKET positions' logits
        ids[:, cur] = np.asarray(jnp.argmax(logits[:, cur - 1 - (bucket - BUCKET)], -1))
    return ids[:, :t + new]


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Best wall time of `repeats` calls (after one untimed warm-up call)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-repo")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, help=(
        "override the preset's (the recompute baseline's logits over every prefix "
        "position grow with it)"))
    args = parser.parse_args()

    cfg = rj.ModelConfig.preset(args.preset)
    if args.vocab_size:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x, logits_to_keep=BUCKET).logits)

    prefill_s, _ = timed(lambda: rj.generate(model, prompt, 1, eos_id=-1))
    cached_s, cached = timed(lambda: rj.generate(model, prompt, args.new, eos_id=-1))
    recompute_s, recomputed = timed(lambda: recompute_prefix(forward, state, prompt, args.new), 1)
    same = np.array_equal(np.asarray(cached), recomputed)

    tokens = args.batch * args.new
    decode_tokens = args.batch * (args.new - 1)
    print(f"{args.preset}: {rj.param_count(cfg) / 1e6:.1f}M parameters, vocab {cfg.vocab_size}, RePo layers "
          f"{list(cfg.repo_layers)}, batch {args.batch}, prompt {args.prompt}, new {args.new}, "
          f"{jax.devices()[0].platform}")
    print(f"{'':28s} {'seconds':>9} {'tokens/s':>10} {'ms/token':>9}")
    print(f"{'KV cache (prefill + decode)':28s} {cached_s:9.3f} {tokens / cached_s:10.1f} "
          f"{1e3 * cached_s / args.new:9.2f}")
    print(f"{'KV cache, decode only':28s} {cached_s - prefill_s:9.3f} "
          f"{decode_tokens / (cached_s - prefill_s):10.1f} "
          f"{1e3 * (cached_s - prefill_s) / (args.new - 1):9.2f}")
    print(f"{'recompute whole prefix':28s} {recompute_s:9.3f} {tokens / recompute_s:10.1f} "
          f"{1e3 * recompute_s / args.new:9.2f}")
    print(f"speed-up of the cache: {recompute_s / cached_s:.1f}x end to end "
          f"(same tokens: {same})")


if __name__ == "__main__":
    main()
