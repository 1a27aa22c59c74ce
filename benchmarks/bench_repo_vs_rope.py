"""Forward+backward time of RePo against plain RoPE on the same small config.

Both models are timed in one run, interleaved (so machine noise hits both alike),
and the script prints the median times, the measured ratio and the analytic
FLOP ratio (the paper reports about +0.9% FLOPs at 1B).

    python -m benchmarks.bench_repo_vs_rope [--layers 8 --hidden 512 --seq 512 --batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import repo_jax as rj
from repo_jax.train.flops import flops_per_token


def step_fn(cfg: rj.ModelConfig):
    graphdef, state = nnx.split(rj.Olmo2Model(cfg, rngs=nnx.Rngs(0)))

    def loss(state, ids):
        logits = nnx.merge(graphdef, state)(ids)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss)), state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    base = rj.ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads,
                          num_key_value_heads=a.heads)
    start = max(1, a.layers * 5 // 16)  # the 1B recipe's 5-of-16 proportion
    configs = {"rope": base, "repo": base.replace(repo_start_layer=start)}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq)), jnp.int32)
    fns = {k: step_fn(c) for k, c in configs.items()}
    for fn, state in fns.values():  # compile
        jax.block_until_ready(fn(state, ids))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, (fn, state) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, ids))
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = {k: flops_per_token(c, a.seq) for k, c in configs.items()}
    params = {k: rj.param_count(c) for k, c in configs.items()}
    print(f"config: {a.layers} layers, d={a.hidden}, heads={a.heads}, seq={a.seq}, batch={a.batch}, "
          f"vocab={a.vocab}, RePo from layer {start}; backend={jax.default_backend()}")
    for k in fns:
        print(f"{k:5s} fwd+bwd median {med[k] * 1e3:8.1f} ms  params {params[k]:,}  "
              f"training FLOPs/token {flops[k]:,.0f}")
    print(f"time ratio RePo/RoPE: {med['repo'] / med['rope']:.3f}  "
          f"(FLOP ratio {flops['repo'] / flops['rope']:.4f}, "
          f"param ratio {params['repo'] / params['rope']:.4f})")


if __name__ == "__main__":
    main()
