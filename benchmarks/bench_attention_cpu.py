"""Causal attention fwd+bwd on the CPU: the `xla` choice's paths side by side with
PyTorch's `scaled_dot_product_attention`, float32, one run, interleaved, best of N.

    python -m benchmarks.bench_attention_cpu                 # 4 x 512 x 8 heads, 2 x 2048 x 4 heads
    python -m benchmarks.bench_attention_cpu --shape 2 4096 4 64 --reps 3

Paths: dense (the reference, a [T, T] array per head), tiled (`blockwise` with the CPU
tile; online softmax, memory linear in T), chunks (`_causal_chunks`, what `xla` runs on
a CPU while the saved probabilities fit, with its written-out gradient), chunks-ad
(autodiff of the same chunked forward) and chunks-nocopy (the written-out gradient
without the transposed copies of Q and dO it takes from 1024 tokens on). Runs with the trainer's host-memory setting
(`repo_jax.host_memory`). Each prints ms per fwd+bwd, the ratio
to dense and to torch, and its largest gradient difference from dense.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def without_row_copies(f):
    """f (a gradient: the backward pass is traced with it) with `_chunked_bwd`'s dK/dV
    from Q and dO as they are, whatever the length: the threshold is read when jit traces."""
    from repo_jax import attention as A

    def traced(*args):
        saved, A._COPY_ROWS_MIN_T = A._COPY_ROWS_MIN_T, 1 << 62
        try:
            return f(*args)
        finally:
            A._COPY_ROWS_MIN_T = saved
    return traced


def run(b: int, t: int, h: int, d: int, reps: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks.timing import best_interleaved

    from repo_jax import attention as A

    rng = np.random.default_rng(0)
    host = [rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3)]
    q, k, v = (jnp.asarray(x) for x in host)
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment = jnp.zeros((b, t), jnp.int32)
    kw = dict(q_index=index, kv_index=index, q_segment=segment, kv_segment=segment)
    paths = {
        "dense": lambda q, k, v: A._xla(q, k, v, A.visible(index, index, segment, segment)),
        "tiled": lambda q, k, v: A._blockwise(q, k, v, block_size=A._CPU_TILE, **kw),
        "chunks": lambda q, k, v: A._causal_chunks(q, k, v, chunk=A._cpu_chunk(t), **kw),
        "chunks-ad": lambda q, k, v: A._chunked_fwd(q, k, v, index, index, segment, segment,
                                                    A._cpu_chunk(t))[0],
        "chunks-nocopy": lambda q, k, v: A._causal_chunks(q, k, v, chunk=A._cpu_chunk(t), **kw),
    }
    grads = {name: jax.grad(lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))
             for name, f in paths.items()}
    grads["chunks-nocopy"] = without_row_copies(grads["chunks-nocopy"])
    fns = {name: jax.jit(g) for name, g in grads.items()}
    ref = fns["dense"](q, k, v)
    errors = {name: max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(fn(q, k, v), ref))
              for name, fn in fns.items()}

    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_() for x in host)

    def torch_step():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        torch.sin(out).sum().backward()
        tq.grad = tk.grad = tv.grad = None

    sides = {name: (lambda fn=fn: jax.block_until_ready(fn(q, k, v))) for name, fn in fns.items()}
    sides["torch sdpa"] = torch_step
    best = best_interleaved(sides, reps)
    print(f"\nB={b} T={t} H={h} D={d} (chunk {A._cpu_chunk(t)}, tile {A._CPU_TILE})")
    for name, s in best.items():
        err = f"{errors[name]:.1e}" if name in errors else "-"
        print(f"  {name:13s} {s * 1e3:8.1f} ms   dense/this {best['dense'] / s:5.2f}x   "
              f"torch/this {best['torch sdpa'] / s:5.2f}x   max |grad - dense| {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, action="append", metavar=("B", "T", "H", "D"))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    for shape in args.shape or [(4, 512, 8, 64), (2, 2048, 4, 64)]:
        run(*shape, args.reps)


if __name__ == "__main__":
    from repo_jax.host_memory import reexec_with_host_allocator

    reexec_with_host_allocator()  # as train.py does; the torch side inherits the setting
    main()
