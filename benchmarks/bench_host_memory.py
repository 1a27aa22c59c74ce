"""Train-step time, system time, page faults and peak RSS with and without
`glibc.malloc.hugetlb=1` (repo_jax/host_memory.py), side by side in one run.

Each round starts one process per setting, in alternating order; a process builds the
bench_train case's step, runs `--warmup` steps, then times `--steps` steps with
getrusage. Ratios are per round (same minute, same machine load), their median printed.

    python -m benchmarks.bench_host_memory                      # transformer case
    python -m benchmarks.bench_host_memory --case long --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"4 KiB pages (glibc default)": "glibc.malloc.hugetlb=0",
            "2 MiB pages (host_memory)": "glibc.malloc.hugetlb=1"}


def child(case: str, warmup: int, steps: int) -> None:
    import resource
    import time

    import numpy as np

    from benchmarks.bench_train import CASES, jax_train_step, model_config
    from repo_jax.config import OptimizerConfig

    c = CASES[case]
    tokens = np.random.default_rng(0).integers(0, c.vocab, (c.batch, c.seq)).astype(np.int32)
    step, state, batch = jax_train_step(model_config(c), tokens, OptimizerConfig(lr=1e-3), 1e-5)
    for _ in range(warmup):
        state[0], m = step(state[0], batch)
        float(m["loss"])
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    losses = []
    for _ in range(steps):
        state[0], m = step(state[0], batch)
        losses.append(float(m["loss"]))
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    print(json.dumps({"wall": wall / steps, "user": (r1.ru_utime - r0.ru_utime) / steps,
                      "sys": (r1.ru_stime - r0.ru_stime) / steps,
                      "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
                      "rss_gb": r1.ru_maxrss * 1024 / 1e9, "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="transformer", help="a benchmarks/bench_train.py case")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.case, args.warmup, args.steps)

    from repo_jax.host_memory import huge_page_env

    if huge_page_env({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}) is None:
        print("note: repo_jax.host_memory would not enable huge pages on this host "
              "(not Linux/glibc>=2.35, THP 'never', or JAX on an accelerator)")
    rows = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        for name in (list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))):
            env = {**os.environ, "GLIBC_TUNABLES": SETTINGS[name]}
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_memory", "--child",
                                  "--case", args.case, "--warmup", str(args.warmup), "--steps", str(args.steps)],
                                 env=env, capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parents[1])
            rows[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"case {args.case}: {args.rounds} rounds x {args.steps} steps, per step")
    print(f"  {'':28s} {'wall s':>8s} {'user s':>8s} {'sys s':>8s} {'faults':>9s} {'max RSS GB':>10s}")
    for name, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("wall", "user", "sys", "faults", "rss_gb")}
        print(f"  {name:28s} {med['wall']:8.3f} {med['user']:8.3f} {med['sys']:8.3f} "
              f"{med['faults']:9.0f} {med['rss_gb']:10.2f}")
    base, huge = (rows[k] for k in SETTINGS)
    speed = [b["wall"] / h["wall"] for b, h in zip(base, huge)]
    same = all(b["losses"] == h["losses"] for b, h in zip(base, huge))
    print(f"  speed-up with 2 MiB pages: {statistics.median(speed):.3f}x (rounds {min(speed):.3f}-{max(speed):.3f}); "
          f"losses bit-identical: {same}")


if __name__ == "__main__":
    main()
