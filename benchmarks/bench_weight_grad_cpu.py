"""Weight gradients x^T @ g on the CPU, XLA's transposed-operand dot against a copied x^T
(`repo_jax.linear`), with PyTorch's for scale, float32, side by side in one run
(interleaved, best of N): which of the model's linears should take the copy.

    python -m benchmarks.bench_weight_grad_cpu                 # the linears of bench_train's cases
    python -m benchmarks.bench_weight_grad_cpu --shape 2048 512 8192 --reps 20

Each line is one [N, d_in] x [d_in, d_out] linear: ms for its weight gradient, and the
ratio copy / plain (below 1: the copy pays). The model takes the copy for the
vocabulary projection and RePo's gate/content maps (`copied_grad=True` in
`repo_jax/model.py`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (tokens, d_in, d_out, the linear): bench_train's transformer (4 x 512 tokens, d=512,
# I=1536, vocab 8192) and long (2 x 2048, d=256, I=768, vocab 4096) cases.
SHAPES = [
    (2048, 512, 512, "transformer q/k/v/o_proj"),
    (2048, 512, 1536, "transformer gate/up_proj"),
    (2048, 1536, 512, "transformer down_proj"),
    (2048, 512, 64, "transformer RePo gate/content_map"),
    (2048, 512, 8192, "transformer lm_head"),
    (4096, 256, 256, "long q/k/v/o_proj"),
    (4096, 256, 768, "long gate/up_proj"),
    (4096, 768, 256, "long down_proj"),
    (4096, 256, 4096, "long lm_head"),
]


def run(n: int, d_in: int, d_out: int, what: str, reps: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks.timing import best_interleaved
    from repo_jax.linear import copied_grad_dot_general

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d_in), dtype=np.float32)
    w = rng.standard_normal((d_in, d_out), dtype=np.float32) * d_in ** -0.5
    g = rng.standard_normal((n, d_out), dtype=np.float32)

    def weight_grad(dot_general):
        def f(x, w, g):
            return jax.vjp(lambda w: dot_general(x, w, (((1,), (0,)), ((), ()))), w)[1](g)[0]
        return jax.jit(f)

    plain, copied = weight_grad(jax.lax.dot_general), weight_grad(copied_grad_dot_general)
    args = [jnp.asarray(a) for a in (x, w, g)]
    tx, tg = torch.from_numpy(x), torch.from_numpy(g)
    sides = {"plain": lambda: jax.block_until_ready(plain(*args)),
             "copy": lambda: jax.block_until_ready(copied(*args)),
             "torch": lambda: tx.T @ tg}
    best = best_interleaved(sides, reps)
    flops = 2 * n * d_in * d_out
    cells = "  ".join(f"{k} {s * 1e3:7.2f} ms {flops / s / 1e9:5.0f} GF/s" for k, s in best.items())
    print(f"{what:34s} [{n}, {d_in}] -> {d_out:5d}: {cells}  copy/plain {best['copy'] / best['plain']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "D_IN", "D_OUT"))
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    for shape in [(*s, "") for s in args.shape] if args.shape else SHAPES:
        run(*shape, args.reps)


if __name__ == "__main__":
    from repo_jax.host_memory import reexec_with_host_allocator

    reexec_with_host_allocator()  # as train.py does; the torch side inherits the setting
    main()
