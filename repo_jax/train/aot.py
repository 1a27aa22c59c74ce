"""Compile the real training step for a TPU slice on any host (no TPU, no data).

    python train.py --config configs/olmo2-1b-repo.yaml --compile-only --topology v5p-64

builds exactly what `run` builds (`repo_jax.train.build`: mesh, shardings,
optimizer, the jitted train and eval steps) on the compile-only devices of
`jax.experimental.topologies` and compiles it with XLA:TPU (libtpu, see
requirements-tpu.txt). It reports per-chip memory against the chip's HBM, the
collectives in the compiled HLO, and a roofline estimate of the step time and MFU.

Topology names: Cloud TPU accelerator types (`v4-N`, `v5p-N`: N TensorCores, two
per chip, so v5p-64 is 32 chips; `v5e-N` / `v5litepod-N`, `v6e-N`: N chips) or
explicit chip grids (`v5p:4x4x4`, `v5e:4x4`).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from repo_jax.config import ConfigError, TrainConfig

GIB = 1024 ** 3


@dataclass(frozen=True)
class Chip:
    generation: str      # the prefix of libtpu's topology names
    hbm_bytes: int
    peak_flops: float    # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    cores_per_chip: int  # how accelerator-type names count (TensorCores)
    dims: int            # torus dimensions


# Datasheets: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}.
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9, 2, 3),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
# Chip grids of the common single-slice shapes (Cloud TPU docs' topology tables).
_GRIDS = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """`v5p-64` or `v5p:2x4x4` -> (chip, libtpu topology name, chips per slice)."""
    m = re.fullmatch(r"(v\d+[a-z]*)([-:])([\dx]+)", name.strip().lower())
    gen = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in CHIPS:
        raise ConfigError(f"--topology {name!r}: use an accelerator type such as v5p-64, v4-32, "
                          f"v5e-16, v6e-64 or a chip grid such as v5p:4x4x4 "
                          f"(generations: {sorted(CHIPS)})")
    chip = CHIPS[gen]
    if m.group(2) == ":":
        grid = m.group(3)
        sizes = [int(s) for s in grid.split("x")]
        if len(sizes) != chip.dims:
            raise ConfigError(f"--topology {name!r}: {gen} grids have {chip.dims} dimensions")
        return chip, f"{gen}:{grid}", math.prod(sizes)
    count = int(m.group(3))
    chips = count // chip.cores_per_chip
    grid = _GRIDS[chip.dims].get(chips)
    if grid is None or count % chip.cores_per_chip:
        known = [f"{gen}-{c * chip.cores_per_chip}" for c in _GRIDS[chip.dims]]
        raise ConfigError(f"--topology {name!r}: not a {gen} slice this tool knows; use one of "
                          f"{known} or a chip grid such as {gen}:{_GRIDS[chip.dims][64]}")
    return chip, f"{gen}:{grid}", chips


def topology_devices(topology: str, num_slices: int = 1):
    """Compile-only TPU devices of `num_slices` slices of `topology` (needs libtpu)."""
    # Compile-only devices never open a TPU, so libtpu's one-process lock is not needed.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError("--compile-only needs libtpu: pip install -r requirements-tpu.txt") from None
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices


_COLLECTIVE = re.compile(r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute|collective-broadcast)(?:-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions in the compiled HLO (an op inside a loop body counts once)."""
    return dict(sorted(Counter(m.group(1) for m in _COLLECTIVE.finditer(hlo_text)).items()))


def memory_report(mem, hbm: int) -> dict[str, Any]:
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
            "code": mem.generated_code_size_in_bytes, "total": total, "hbm": hbm,
            "fits": total <= hbm, "headroom": 1.0 - total / hbm}


_OOM_LINE = re.compile(r"(Ran out of memory.*|Used .* of .* hbm.*|Exceeded hbm capacity.*|"
                       r"Total hbm usage.*)", re.I)


def oom_summary(message: str, top: int = 6) -> str:
    """The useful lines of XLA:TPU's RESOURCE_EXHAUSTED message: the totals and the
    largest allocations with the operations that made them."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    head = [ln for ln in lines if _OOM_LINE.search(ln)][:3]
    largest = []
    for i, ln in enumerate(lines):
        if re.match(r"\d+\.\s+Size:", ln):
            size = ln.split("Size:", 1)[1].strip()
            detail = next((x for x in lines[i + 1:i + 8] if x.startswith(("Operator:", "Shape:"))), "")
            op = next((x for x in lines[i + 1:i + 8] if x.startswith("Operator:")), "")
            shape = next((x for x in lines[i + 1:i + 8] if x.startswith("Shape:")), detail)
            largest.append(f"  {size:>10}  {shape.removeprefix('Shape: ')}  {op.removeprefix('Operator: ')[:160]}")
            if len(largest) == top:
                break
    if not head and not largest:
        head = lines[:3]
    return "\n".join(head + (["largest allocations:"] + largest if largest else []))


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {k: float(cost.get(k, float("nan"))) for k in ("flops", "bytes accessed")}


ESTIMATE_HOW = (
    "XLA's cost analysis counts a while-loop body once (measured: a scan of 8 matmuls reports "
    "the FLOPs of one), which would undercount the scanned layers, gradient accumulation and "
    "loss chunks. So the step is compiled again without loops (scan_layers=False, grad_accum=1, "
    "loss_chunk=0) for 1 sequence per data shard, and its FLOPs and HBM bytes per chip are "
    "scaled by the real sequences per shard (which also scales the once-per-step optimizer "
    "update, a few ms at most). Step time = max(FLOPs / peak, "
    "bytes / HBM bandwidth): a roofline that ignores communication, so an upper bound on MFU. "
    "MFU counts the trainer's model FLOPs (6N + attention, repo_jax/train/flops.py), not "
    "the remat recompute. A Pallas kernel (splash) is a custom call whose FLOPs and bytes the "
    "cost analysis does not see (it gave an MFU above 100%), so the loop-free step computes "
    "attention with the dense xla path, which, like the trainer's formula, counts all T keys: "
    "for the causal splash kernel, which skips the upper tiles, a conservative estimate.")


def _estimate(cfg: TrainConfig, chip: Chip, chips: int, seqs_per_shard: int,
              counted: dict[str, float], one: dict[str, float]) -> dict[str, Any]:
    from repo_jax.train import flops

    model = flops.flops_per_token(cfg.model, cfg.data.seq_len) * cfg.tokens_per_step / chips
    hw, hbm = (one[k] * seqs_per_shard for k in ("flops", "bytes accessed"))
    compute, memory = hw / chip.peak_flops, hbm / chip.hbm_bandwidth
    step = max(compute, memory)
    return {"how": ESTIMATE_HOW, "model_flops_per_chip": model, "hardware_flops_per_chip": hw,
            "hbm_bytes_per_chip": hbm, "xla_flops_counted_with_loops": counted["flops"],
            "compute_time": compute, "memory_time": memory, "step_time": step,
            "mfu": model / (step * chip.peak_flops),
            "tokens_per_sec_per_chip": cfg.tokens_per_step / chips / step,
            "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth}


def _multislice_mesh(cfg: TrainConfig, devices, num_slices: int):
    """Slices joined over the data-center network along `data` (the axis with the least
    traffic: one gradient all-reduce per step), each slice's ICI mesh inside."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from repo_jax import sharding as shd

    data, fsdp, tensor = shd.mesh_shape(cfg.mesh, len(devices))
    if data % num_slices:
        raise ConfigError(f"--num-slices={num_slices}: slices are joined along mesh.data, which is "
                          f"{data}; make mesh.data a multiple of {num_slices}")
    grid = mesh_utils.create_hybrid_device_mesh((data // num_slices, fsdp, tensor), (num_slices, 1, 1),
                                                devices)
    return Mesh(np.asarray(grid), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _shard_bytes(tree) -> int:
    """Bytes one chip holds of sharded ShapeDtypeStructs (the first device's shards)."""
    import jax

    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _compile(fn, *args):
    """(compiled, seconds); XLA:TPU's out-of-memory error becomes a ConfigError."""
    import jax

    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise OutOfMemory(oom_summary(str(e))) from None
    return compiled, time.perf_counter() - t0


class OutOfMemory(ConfigError):
    """The step does not fit in the chip's HBM; the message names the largest consumers."""


def compile_for_topology(cfg: TrainConfig, topology: str, num_slices: int = 1, *,
                         eval_step: bool = True, estimate: bool = True, log=None) -> dict[str, Any]:
    import jax

    from repo_jax import sharding as shd
    from repo_jax.train.build import batch_shapes, build

    log = log or functools.partial(print, flush=True)  # flushed: compiles take minutes
    chip, topo_name, _ = parse_topology(topology)
    devices = topology_devices(topo_name, num_slices)
    mesh = shd.make_mesh(cfg.mesh, devices) if num_slices == 1 else _multislice_mesh(cfg, devices, num_slices)
    built = build(cfg, mesh)
    state = built.abstract_state()
    train_batch, eval_batch = batch_shapes(cfg, mesh)
    chips = len(devices)
    log(f"compiling the train step for {topology} ({topo_name} x {num_slices} slice(s), {chips} "
        f"chips of {devices[0].device_kind}), mesh {dict(mesh.shape)}, "
        f"{cfg.batch_size} x {cfg.data.seq_len} tokens/step, grad_accum {cfg.grad_accum}")
    report: dict[str, Any] = {"topology": topology, "tpu_topology": topo_name, "num_slices": num_slices,
                              "chips": chips, "device_kind": devices[0].device_kind,
                              "mesh": dict(mesh.shape), "batch_size": cfg.batch_size,
                              "seq_len": cfg.data.seq_len, "grad_accum": cfg.grad_accum,
                              "params": sum(math.prod(v.shape) for v in built.spec.abstract.values())}
    try:
        compiled, seconds = _compile(built.train_step, state, train_batch)
    except OutOfMemory as e:
        # libtpu 0.0.42 reports only the temporaries' total; name what we know exactly.
        parallel = shd.batch_parallelism(mesh)
        consumers = {"parameters + optimizer state per chip (exact, from the shardings)": _shard_bytes(state),
                     "activations": f"{cfg.micro_batch_size // parallel} sequences x {cfg.data.seq_len} "
                                    f"tokens per chip per micro-batch, model.remat={cfg.model.remat}, "
                                    f"loss_chunk={cfg.loss_chunk}, attention_impl={cfg.model.attention_impl}"}
        report["train"] = {"memory": {"fits": False, "hbm": chip.hbm_bytes}, "out_of_memory": str(e),
                           "consumers": consumers}
        return report
    report["train"] = {"compile_seconds": seconds,
                       "memory": memory_report(compiled.memory_analysis(), chip.hbm_bytes),
                       "collectives": count_collectives(compiled.as_text())}
    counted = _cost(compiled)
    del compiled
    if eval_step or estimate:
        log(format_report(report))  # the verdict now: the compiles below take as long again
    if eval_step:
        compiled, seconds = _compile(built.eval_step, state.params, eval_batch)
        report["eval"] = {"compile_seconds": seconds,
                          "memory": memory_report(compiled.memory_analysis(), chip.hbm_bytes)}
        del compiled
    if estimate:
        log("compiling the loop-free step at 1 sequence per shard for the cost estimate")
        parallel = shd.batch_parallelism(mesh)
        d = cfg.to_dict()
        # XLA's cost analysis sees nothing inside a Pallas custom call (splash): the estimate
        # counts attention as the dense xla path computes it instead.
        model = {**d["model"], "attention_impl": "xla"}
        flat = TrainConfig.from_dict({**d, "model": model, "scan_layers": False, "grad_accum": 1,
                                      "batch_size": parallel, "loss_chunk": 0})
        flat_built = build(flat, mesh)
        compiled, _ = _compile(flat_built.train_step, flat_built.abstract_state(),
                               batch_shapes(flat, mesh)[0])
        report["estimate"] = _estimate(cfg, chip, chips, cfg.batch_size // parallel, counted,
                                       _cost(compiled))
        del compiled
    jax.clear_caches()
    return report


def format_report(r: dict[str, Any]) -> str:
    def gib(b):
        return f"{b / GIB:.2f} GiB"

    m = r["train"]["memory"]
    if "out_of_memory" in r["train"]:
        known = "".join(f"\n  {k}: {gib(v) if isinstance(v, int) else v}"
                        for k, v in r["train"]["consumers"].items())
        return (f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}: the train "
                f"step DOES NOT FIT in {gib(m['hbm'])} of HBM per chip\n{r['train']['out_of_memory']}{known}")
    verdict = (f"fits, {m['headroom']:.1%} of HBM left" if m["fits"]
               else f"DOES NOT FIT: {gib(m['total'] - m['hbm'])} over")
    lines = [f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}: {verdict}",
             f"  per chip: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, "
             f"aliased {gib(m['aliased'])}, temporaries {gib(m['temporaries'])}, total "
             f"{gib(m['total'])} of {gib(m['hbm'])} HBM",
             f"  compile {r['train']['compile_seconds']:.1f}s; collectives {r['train']['collectives']}"]
    if "eval" in r:
        e = r["eval"]["memory"]
        lines.append(f"  eval step: total {gib(e['total'])} ({'fits' if e['fits'] else 'DOES NOT FIT'})")
    if "estimate" in r:
        est = r["estimate"]
        lines.append(f"  estimate: step {est['step_time']:.2f}s (compute {est['compute_time']:.2f}s, "
                     f"HBM {est['memory_time']:.2f}s), MFU {est['mfu']:.1%}, "
                     f"{est['tokens_per_sec_per_chip']:.0f} tokens/s/chip (roofline, no communication)")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def main(cfg: TrainConfig, topology: str, num_slices: int = 1, out: str = "",
         quick: bool = False) -> int:
    """The `train.py --compile-only` command: print the report, write it as JSON
    (default: run_dir/compile-<topology>.json); exit status 1 when it does not fit."""
    from pathlib import Path

    if num_slices < 1:
        raise ConfigError(f"--num-slices={num_slices} must be at least 1")
    report = compile_for_topology(cfg, topology, num_slices, eval_step=not quick, estimate=not quick)
    report["config"] = cfg.to_dict()
    path = Path(out or Path(cfg.run_dir) / f"compile-{topology.replace(':', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, str(path))
    print(format_report(report))
    print(f"report: {path}")
    fits = report["train"]["memory"]["fits"] and report.get("eval", {"memory": {"fits": True}})["memory"]["fits"]
    if not fits:
        print(f"error: this config does not fit on {topology} (what takes the memory: above): raise "
              "grad_accum, lower loss_chunk, set model.remat=full, or use more chips", file=sys.stderr)
    return 0 if fits else 1
