"""Streaming conversion at real OLMo-2 1B shapes: peak memory and throughput.

Builds a synthetic Hugging Face checkpoint with the shapes of OLMo-2 1B (float32,
about 6 GB, sharded at 5 GB like save_pretrained), then measures, each in its own
process (peak RSS from wait4):

  plain copy   the same files copied byte for byte and fsynced, as the converter
               fsyncs what it writes (the disk's speed)
  baseline     a process that only imports what the converter imports
  import       python -m convert import SRC DST
  export       python -m convert export DST HF

and prints time, MB/s and peak RSS next to the checkpoint size and its largest
tensor. Everything is deleted at the end.

    python benchmarks/bench_convert.py [--workdir /tmp] [--preset olmo2-1b]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repo_jax.config import ModelConfig  # noqa: E402
from repo_jax.hf_format import config_to_hf, path_to_hf  # noqa: E402
from repo_jax.safetensors_io import SafetensorsFile, SafetensorsWriter  # noqa: E402

SHARD = 5 * 10**9


def hf_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every parameter, in model order."""
    from convert.layout import expected_params

    out = []
    for path, shape in expected_params(cfg).values():
        name, transpose = path_to_hf(path)
        out.append((name, shape[::-1] if transpose else shape))
    return out


def build(directory: Path, cfg: ModelConfig) -> tuple[int, int]:
    """Write config.json + sharded float32 safetensors + index, a block at a time.
    Returns (total bytes, largest tensor bytes)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    tensors = hf_tensors(cfg)
    sizes = [int(np.prod(s)) * 4 for _, s in tensors]
    shards, used = [[]], 0
    for t, size in zip(tensors, sizes):
        if shards[-1] and used + size > SHARD:
            shards, used = shards + [[]], 0
        shards[-1].append(t)
        used += size
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, group in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(directory / file, [(n, np.float32, s) for n, s in group])
        for name, shape in group:
            rows = max(1, (64 << 20) // (4 * int(np.prod(shape[1:]))))
            for start in range(0, shape[0], rows):
                n = min(rows, shape[0] - start)
                if name.endswith("norm.weight"):
                    block = 1.0 + 0.1 * rng.standard_normal((n, *shape[1:]), dtype=np.float32)
                else:
                    block = 0.02 * rng.standard_normal((n, *shape[1:]), dtype=np.float32)
                writer.write(name, block)
            weight_map[name] = file
        writer.close()
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
    return sum(sizes), max(sizes)


# Runs a module or code in a fresh process and reports that process's own peak RSS
# (VmHWM) at exit. rusage from wait4 would not do: ru_maxrss survives exec, so a
# child forked from this (large) process would inherit its footprint.
_CHILD = r"""
import atexit, runpy, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\nPEAK_RSS_KB " + line.split()[1] + "\n")
atexit.register(_peak)
mode, target, *rest = sys.argv[1:]
sys.argv = [target, *rest]
runpy.run_module(target, run_name="__main__", alter_sys=True) if mode == "-m" else exec(target)
"""


_COPY = """
import os, shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2])
for name in os.listdir(sys.argv[2]):
    fd = os.open(os.path.join(sys.argv[2], name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def measure(mode: str, target: str, *args: str) -> tuple[float, float]:
    """Run `python -m target args` (mode "-m") or code `target` (mode "-c") with
    sys.argv[1:] = args; return (seconds, peak RSS in MB) of that process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, target, *args], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{target} {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    peak = int(proc.stderr.rsplit("PEAK_RSS_KB ", 1)[1].split()[0])
    return seconds, peak / 1024


def _tensor(directory: Path, name: str) -> np.ndarray:
    index = directory / "model.safetensors.index.json"
    file = (json.loads(index.read_text())["weight_map"][name] if index.exists()
            else "model.safetensors")
    return SafetensorsFile(directory / file).read(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--preset", default="olmo2-1b")
    args = ap.parse_args()
    cfg = ModelConfig.preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench_convert.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        total, largest = build(work / "hf", cfg)
        mb = total / 1e6
        print(f"checkpoint: {args.preset} shapes, {len(hf_tensors(cfg))} tensors, "
              f"{mb:,.0f} MB float32 in {len(list((work / 'hf').glob('*.safetensors')))} shards, "
              f"largest tensor {largest / 1e6:,.0f} MB (built in {time.perf_counter() - t0:.0f} s)")
        rows = []
        rows = [("plain copy", *measure("-c", _COPY, str(work / "hf"), str(work / "copy")), mb)]
        shutil.rmtree(work / "copy")
        rows.append(("baseline (imports only)", *measure(
            "-c", "import convert.importer, convert.exporter, tensorstore, jax; "
                  "jax.numpy.zeros(1).block_until_ready()"), None))
        rows.append(("convert import", *measure("-m", "convert", "import", str(work / "hf"),
                                                str(work / "rj")), mb))
        rows.append(("convert export", *measure("-m", "convert", "export", str(work / "rj"),
                                                str(work / "out")), mb))
        startup = rows[1][1]
        print(f"\n{'':24s}{'seconds':>8s}{'MB/s':>7s}{'MB/s after startup':>20s}"
              f"{'peak RSS MB':>13s}{'RSS/ckpt':>10s}")
        for name, seconds, rss, size in rows:
            rate = f"{size / seconds:7.0f}" if size else f"{'':>7s}"
            streamed = size and name != "plain copy"
            net = f"{size / (seconds - startup):20.0f}" if streamed else f"{'':>20s}"
            print(f"{name:24s}{seconds:8.1f}{rate}{net}{rss:13.0f}{rss / mb:10.3f}")
        copy_rate = mb / rows[0][1]
        for name, seconds, rss, _ in rows[2:]:
            print(f"{name}: {mb / seconds / copy_rate:.2f} x plain-copy speed; peak RSS "
                  f"{rss:,.0f} MB = {rss / mb:.1%} of the checkpoint, "
                  f"{rss / (largest / 1e6):.2f} x "
                  f"its largest tensor, {rss - rows[1][2]:,.0f} MB above the import-only baseline")
        # The round trip is exact: compare a few tensors bitwise.
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
                     "lm_head.weight"):
            a, b = (_tensor(work / d, name) for d in ("hf", "out"))
            same = "bitwise identical" if np.array_equal(a, b) else "DIFFERS"
            print(f"round trip {name}: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
