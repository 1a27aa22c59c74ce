"""Per-chip memory of pod configurations, from the real XLA:TPU compiler on this host.

    python -m benchmarks.bench_tpu_compile [--cases issue,targets,weak] [--estimate]

Each case runs `train.py --compile-only` in its own process (one at a time: an
XLA:TPU compile of a 7B step takes minutes and GBs of RAM) and the script prints
a markdown table from the JSON reports. Needs requirements-tpu.txt.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_B, SEVEN_B = "configs/olmo2-1b-repo.yaml", "configs/olmo2-7b-repo.yaml"

# name -> (config, topology, overrides)
CASES = {
    "issue": {  # the first table of issue 8, each on the topology it names
        "1b bs64 fsdp64": (ONE_B, "v5p:4x4x4", ["batch_size=64"]),
        "1b bs512 fsdp64": (ONE_B, "v5p:4x4x4", []),
        "1b bs512 fsdp64 remat=none": (ONE_B, "v5p:4x4x4", ["model.remat=none"]),
        "7b bs128 fsdp32 x tensor4": (SEVEN_B, "v5p:4x4x8", ["batch_size=128", "grad_accum=1"]),
        "1b bs512 data64": (ONE_B, "v5p:4x4x4", ["mesh.data=64", "mesh.fsdp=1"]),
    },
    "targets": {  # the presets exactly as shipped
        "1b preset": (ONE_B, "v5p-64", []),
        "7b preset": (SEVEN_B, "v5p-128", []),
    },
    "weak": {  # 1B, 8 sequences of 4096 tokens per chip
        "1b v5p-8": (ONE_B, "v5p-8", ["batch_size=32"]),
        "1b v5p-32": (ONE_B, "v5p-32", ["batch_size=128"]),
        "1b v5p-128": (ONE_B, "v5p-128", ["batch_size=512"]),
        "1b v5p-512": (ONE_B, "v5p-512", ["batch_size=2048"]),
    },
}


def run_case(config: str, topology: str, overrides: list[str], estimate: bool, out: Path) -> dict:
    cmd = [sys.executable, "train.py", "--config", config, "--compile-only", "--topology", topology,
           "--out", str(out), *([] if estimate else ["--quick"]), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if not out.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"error": tail or f"exit {proc.returncode}"}
    return json.loads(out.read_text())


def row(name: str, r: dict) -> str:
    gib = 1024 ** 3
    if "error" in r:
        return f"| {name} | error: {r['error'][:120]} |||||"
    m = r["train"]["memory"]
    where = f"{r['topology']} ({r['chips']} chips), mesh {r['mesh']}"
    if "out_of_memory" in r["train"]:
        first = r["train"]["out_of_memory"].splitlines()[0][:100]
        return f"| {name} | {where} | | | | does not fit: {first} |"
    verdict = f"fits, {m['headroom']:.0%} left" if m["fits"] else f"over by {(m['total'] - m['hbm']) / gib:.1f} GiB"
    est = r.get("estimate")
    mfu = f"{est['mfu']:.1%} ({est['step_time']:.2f}s)" if est else ""
    return (f"| {name} | {where} | {m['arguments'] / gib:.2f} | {m['temporaries'] / gib:.2f} | "
            f"{m['total'] / gib:.2f} | {verdict} | {mfu} | {r['train']['compile_seconds']:.0f}s |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="issue,targets,weak")
    parser.add_argument("--estimate", action="store_true", help="also the (slower) MFU estimate")
    parser.add_argument("--keep", default="", help="directory for the JSON reports")
    args = parser.parse_args()
    keep = Path(args.keep or tempfile.mkdtemp(prefix="tpu-compile-"))
    keep.mkdir(parents=True, exist_ok=True)
    print("| case | topology, mesh | arguments GiB | temporaries GiB | total GiB | verdict | est. MFU (step) | compile |")
    print("|---|---|---|---|---|---|---|---|")
    for group in args.cases.split(","):
        for name, (config, topology, overrides) in CASES[group].items():
            out = keep / (name.replace(" ", "_").replace("=", "-") + ".json")
            print(row(name, run_case(config, topology, overrides, args.estimate, out)), flush=True)
    print(f"reports: {keep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
