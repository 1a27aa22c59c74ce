"""One SwiGLU MLP's fwd+bwd on the CPU, JAX against PyTorch, float32, side by side in one
run (interleaved, best of N): how fast each framework runs the matmuls that are most of a
transformer-shaped training step.

    python -m benchmarks.bench_mlp_cpu                     # the transformer case: 2048 x 512 -> 1536
    python -m benchmarks.bench_mlp_cpu --shape 4096 256 768 --reps 20

`benchmarks/bench_train.py` can only beat PyTorch by as much as our step spends less on
the same work; where both run these matmuls at the same rate, the rest of the step (the
attention kernel, elementwise work, the optimizer) has to make up any lead alone.
Prints ms, GFLOP/s (9 matmuls of 2*M*d*I) and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(m: int, d: int, i: int, reps: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks.timing import best_interleaved

    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, d), dtype=np.float32)
    w_gate, w_up = (rng.standard_normal((d, i), dtype=np.float32) * d ** -0.5 for _ in range(2))
    w_down = rng.standard_normal((i, d), dtype=np.float32) * i ** -0.5
    dy = rng.standard_normal((m, d), dtype=np.float32)

    def mlp(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    grads = jax.jit(lambda dy, *a: jax.vjp(mlp, *a)[1](dy))
    args = [jnp.asarray(a) for a in (dy, x, w_gate, w_up, w_down)]

    tx = torch.from_numpy(x).requires_grad_()
    tw = [torch.from_numpy(w.T.copy()).requires_grad_() for w in (w_gate, w_up, w_down)]
    tdy = torch.from_numpy(dy)
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu

    def torch_step():
        linear(silu(linear(tx, tw[0])) * linear(tx, tw[1]), tw[2]).backward(tdy)
        for t in (tx, *tw):
            t.grad = None

    sides = {"jax": lambda: jax.block_until_ready(grads(*args)), "torch": torch_step}
    best = best_interleaved(sides, reps)
    flops = 9 * 2 * m * d * i
    print(f"\nM={m} d={d} I={i}: fwd+bwd of one SwiGLU MLP ({flops / 1e9:.1f} GFLOP)")
    for name, s in best.items():
        print(f"  {name:6s} {s * 1e3:8.1f} ms  {flops / s / 1e9:6.1f} GFLOP/s")
    print(f"  torch time / jax time: {best['torch'] / best['jax']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, action="append", metavar=("M", "D", "I"))
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    for shape in args.shape or [(2048, 512, 1536), (4096, 256, 768)]:
        run(*shape, args.reps)


if __name__ == "__main__":
    from repo_jax.host_memory import reexec_with_host_allocator

    reexec_with_host_allocator()  # as train.py does; the torch side inherits the setting
    main()
