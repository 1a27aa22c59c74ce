"""Per-chip memory of the real training step with `xla` against `splash` attention,
compiled by XLA:TPU for a TPU topology on this (CPU) host: no TPU needed, only libtpu
(`pip install "jax[tpu]==0.10.2"`).

OLMo-2 1B shapes (d=2048, 16 heads of 128, MLP 8192, the 100K vocabulary, bf16 compute,
float32 parameters and AdamW state, full remat, scanned layers) with only --layers
layers (half of them RePo) so that it compiles in minutes; one sequence of --seq tokens
per chip, the mesh all fsdp. Both paths are compiled in the same run and their figures
printed side by side with the ratio; nothing is executed.

    python -m benchmarks.bench_splash_tpu [--topology v5p:2x2x1] [--layers 2] [--seq 4096]
    python -m benchmarks.bench_splash_tpu --attention-only   # attention forward+backward alone

--attention-only compiles the gradient of attention alone (q, k, v [chips, seq, 16, 128]
bf16, one sequence per chip, split over the chips), so the figure is the kernel's own.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

MIB = 1024 ** 2


def _summary(impl: str, chips: int, compiled, seconds: float) -> dict:
    mem = compiled.memory_analysis()
    return {"impl": impl, "chips": chips, "compile_s": seconds,
            "kernel": "tpu_custom_call" in compiled.as_text(),
            "args": mem.argument_size_in_bytes / MIB, "out": mem.output_size_in_bytes / MIB,
            "alias": mem.alias_size_in_bytes / MIB, "temp": mem.temp_size_in_bytes / MIB}


def compile_attention(impl: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from repo_jax import sharding as shd
    from repo_jax.attention import attend
    from repo_jax.config import MeshConfig

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=args.tensor), devices)
    n = len(devices) // args.tensor
    qkv = jax.ShapeDtypeStruct((n, args.seq, 16, 128), jnp.bfloat16,
                               sharding=shd.named(mesh, ("batch", None, "heads", None), (n, args.seq, 16, 128)))

    def loss(q, k, v):
        index = jnp.broadcast_to(jnp.arange(args.seq), (n, args.seq))
        segment = jnp.zeros((n, args.seq), jnp.int32)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            out = attend(q, k, v, q_index=index, kv_index=index, q_segment=segment,
                         kv_segment=segment, impl=impl, block_size=args.block)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv).compile()
    return _summary(impl, len(devices), compiled, time.perf_counter() - start)


def compile_step(impl: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    import repo_jax as rj
    from repo_jax import sharding as shd
    from repo_jax.config import MeshConfig, OptimizerConfig, ScheduleConfig
    from repo_jax.train import TrainState, model_spec
    from repo_jax.train.optimizer import make_optimizer, schedule
    from repo_jax.train.step import make_train_step, opt_state_shardings

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=args.tensor), devices)
    cfg = rj.ModelConfig.preset("olmo2-1b").replace(
        num_hidden_layers=args.layers, layer_schemes=(), repo_start_layer=args.layers // 2,
        dtype="bfloat16", remat="full", attention_impl=impl, attention_block_size=args.block)
    spec = model_spec(cfg, scan_layers=True)
    p_shard = shd.param_shardings(spec.abstract, spec.logical_axes, mesh)
    sched = schedule(ScheduleConfig(), 1e-4, 1000)
    tx = make_optimizer(OptimizerConfig(), sched, spec.abstract.keys())
    shardings = TrainState(shd.replicated(mesh), p_shard, opt_state_shardings(tx, spec.abstract, p_shard, mesh))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         TrainState(jax.ShapeDtypeStruct((), jnp.int32), spec.abstract,
                                    jax.eval_shape(tx.init, spec.abstract)), shardings)
    step = make_train_step(spec, tx, sched, 1e-5, mesh, shardings)
    batch = jax.ShapeDtypeStruct((1, len(devices) // args.tensor, args.seq), jnp.int32,
                                 sharding=shd.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return _summary(impl, len(devices), compiled, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (heads split)")
    parser.add_argument("--block", type=int, default=512, help="splash tile (attention_block_size)")
    parser.add_argument("--attention-only", action="store_true",
                        help="compile attention's gradient alone instead of the training step")
    args = parser.parse_args()
    if importlib.util.find_spec("libtpu") is None:
        sys.exit('error: compiling for a TPU topology needs libtpu; install it with '
                 'pip install "jax[tpu]==0.10.2" (it adds libtpu to this environment)')
    # Compile for the TPU topology; anything executed on the host stays on the CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    compile_fn = compile_attention if args.attention_only else compile_step
    rows = [compile_fn(impl, args) for impl in ("xla", "splash")]
    what = ("attention alone, 16 heads x 128" if args.attention_only
            else f"training step, OLMo-2 1B shapes with {args.layers} layers")
    print(f"{args.topology}, {rows[0]['chips']} chips, mesh fsdp x tensor={args.tensor}, {what}, "
          f"{rows[0]['chips'] // args.tensor} sequences of {args.seq} tokens "
          f"(one per fsdp shard); per-chip MiB from compiled.memory_analysis():")
    print(f"{'attention':>10} {'arguments':>10} {'outputs':>9} {'aliased':>9} {'temporaries':>12} "
          f"{'Mosaic kernel':>14} {'compile s':>10}")
    for r in rows:
        print(f"{r['impl']:>10} {r['args']:>10.1f} {r['out']:>9.1f} {r['alias']:>9.1f} {r['temp']:>12.1f} "
              f"{str(r['kernel']):>14} {r['compile_s']:>10.1f}")
    print(f"temporaries splash / xla: {rows[1]['temp'] / rows[0]['temp']:.3f}")


if __name__ == "__main__":
    main()
