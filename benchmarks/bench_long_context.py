"""Peak memory of a small model's forward at 2K-16K tokens: XLA attention against
the blockwise (memory-linear) path.

For each (attention path, length) a fresh subprocess builds the model, compiles the
forward and reports XLA's own buffer plan for it (arguments + outputs + temporaries,
`compiled.memory_analysis()`), then runs it and reports its peak RSS. Runs whose plan exceeds --max-run-gb are compiled but not run, so
the benchmark cannot take a shared machine down.

    python -m benchmarks.bench_long_context [--lengths 2048,4096,8192,16384]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GB = 1024 ** 3


def model_config(impl: str, block: int):
    import repo_jax as rj

    # The `tiny-repo` preset (d=128, 4 layers, 4 heads, RePo from layer 1) with YaRN x4
    # over 4K, as the paper evaluates at 16K. A 1K vocabulary keeps the [T, V] logits
    # (6.6 GB at 16K with the real 100K vocabulary) from hiding the attention's memory.
    return rj.ModelConfig.preset(
        "tiny-repo", vocab_size=1024, max_position_embeddings=16384, rope_scaling_factor=4.0,
        original_max_position_embeddings=4096, attention_impl=impl, attention_block_size=block)


def child(impl: str, length: int, block: int, max_run_gb: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import repo_jax as rj

    model = rj.Olmo2Model(model_config(impl, block), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (1, length)), jnp.int32)
    compiled = forward.lower(state, ids).compile()
    plan = compiled.memory_analysis()
    planned = plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
    result = {"impl": impl, "length": length, "planned_gb": planned / GB,
              "temp_gb": plan.temp_size_in_bytes / GB}
    if planned / GB > max_run_gb:
        return {**result, "ran": False}
    start = time.perf_counter()
    compiled(state, ids).block_until_ready()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**result, "ran": True, "seconds": seconds, "peak_rss_gb": peak / GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--max-run-gb", type=float, default=6.0,
                        help="compile but do not run forwards planned above this")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.block_size, args.max_run_gb)))
        return

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    rows = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        for impl in ("xla", "blockwise"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_long_context",
                                   "--child", impl, str(length),
                                   "--block-size", str(args.block_size), "--max-run-gb",
                                   str(args.max_run_gb)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{impl} at {length} tokens failed:\n{proc.stderr[-2000:]}")
            rows[impl, length] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  measured {impl:9s} {length:6d}: {rows[impl, length]}", file=sys.stderr)

    def ran(r, key, fmt="{:.2f}"):
        return fmt.format(r[key]) if r["ran"] else "not run"

    print(f"\nForward of tiny-repo (d=128, 4 layers, 4 heads, vocab 1024, YaRN x4), batch 1, "
          f"float32, CPU; blockwise block {args.block_size}")
    print(f"{'tokens':>7} | {'xla plan GB':>11} {'xla RSS GB':>10} {'xla s':>7} | "
          f"{'blk plan GB':>11} {'blk RSS GB':>10} {'blk s':>7} | {'plan ratio':>10}")
    for length in sorted({n for _, n in rows}):
        x, b = rows["xla", length], rows["blockwise", length]
        print(f"{length:7d} | {x['planned_gb']:11.3f} {ran(x, 'peak_rss_gb'):>10} "
              f"{ran(x, 'seconds'):>7} | {b['planned_gb']:11.3f} {ran(b, 'peak_rss_gb'):>10} "
              f"{ran(b, 'seconds'):>7} | {x['planned_gb'] / b['planned_gb']:9.1f}x")
    print("plan = XLA's buffer plan (arguments + outputs + temporaries); RSS = the process's "
          "peak resident memory (includes ~0.3-0.5 GB of runtime); 'not run' = plan above "
          f"--max-run-gb {args.max_run_gb}")


if __name__ == "__main__":
    main()
