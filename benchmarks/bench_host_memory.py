"""Train-step time, system time, page faults and peak RSS under each host allocator
setting of repo_jax/host_memory.py (glibc with 4 KiB pages, glibc with
`glibc.malloc.hugetlb=1`, jemalloc preloaded where installed), side by side in one run.

Each round starts one process per setting, in alternating order; a process builds the
bench_train case's step, runs `--warmup` steps, then times `--steps` steps one by one
with getrusage, after a `--pause` of that many seconds before each (0: back to back).
A pause past the 2 s after which a VM guest's balloon reports freed pages to the host
(repo_jax/host_memory.py) stands for what a training run does between steps now and
then: an evaluation, a checkpoint, a data stall. Ratios are per round (same minute, same
machine load), their median printed; per setting the median and mean step and how many
steps took over 1 s of system time.

    python -m benchmarks.bench_host_memory                      # transformer case
    python -m benchmarks.bench_host_memory --case long --rounds 5
    python -m benchmarks.bench_host_memory --case default --pause 3
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

def settings() -> dict[str, dict[str, str]]:
    """Name -> the environment a child runs under (the parent's, without the allocator
    variables, plus these)."""
    from repo_jax.host_memory import JEMALLOC_CONF, jemalloc_library

    out = {"glibc, 4 KiB pages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
           "glibc, 2 MiB pages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}}
    library = jemalloc_library()
    if library is not None:
        out["jemalloc, large blocks kept"] = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                                              "LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF}
    else:
        print("note: no jemalloc on this host (Debian/Ubuntu: apt-get install libjemalloc2)")
    return out


def child(case: str, warmup: int, steps: int, pause: float) -> None:
    import resource
    import time

    import numpy as np

    from benchmarks.bench_train import CASES, jax_train_step, model_config
    from repo_jax.config import OptimizerConfig
    from repo_jax.host_memory import keep_large_blocks

    keep_large_blocks()  # what reexec_with_host_allocator does after its restart

    c = CASES[case]
    tokens = np.random.default_rng(0).integers(0, c.vocab, (c.batch, c.seq)).astype(np.int32)
    step, state, batch = jax_train_step(model_config(c), tokens, OptimizerConfig(lr=1e-3), 1e-5)
    for _ in range(warmup):
        state[0], m = step(state[0], batch)
        float(m["loss"])
    rss_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_step = {"wall": [], "user": [], "sys": [], "faults": []}
    losses = []
    for _ in range(steps):
        time.sleep(pause)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state[0], m = step(state[0], batch)
        losses.append(float(m["loss"]))
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        for key, value in (("wall", wall), ("user", r1.ru_utime - r0.ru_utime),
                           ("sys", r1.ru_stime - r0.ru_stime), ("faults", r1.ru_minflt - r0.ru_minflt)):
            per_step[key].append(value)
    print(json.dumps({**per_step, "rss_warm_gb": rss_warm * 1024 / 1e9,
                      "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                      "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="transformer", help="a benchmarks/bench_train.py case")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds of idle before each timed step (default 0: back to back)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.pause < 0:
        ap.error("--rounds and --steps must be at least 1, --warmup and --pause at least 0")
    if args.child:
        return child(args.case, args.warmup, args.steps, args.pause)

    from repo_jax.host_memory import host_allocator_env

    own = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")
    clean = {k: v for k, v in os.environ.items() if k not in own}
    if host_allocator_env(clean) is None:
        print("note: repo_jax.host_memory would change nothing on this host "
              "(not Linux, or JAX on an accelerator)")
    table = settings()
    rows = {k: [] for k in table}
    for r in range(args.rounds):
        for name in (list(table) if r % 2 == 0 else list(reversed(table))):
            env = {**clean, **table[name]}
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_memory", "--child",
                                  "--case", args.case, "--warmup", str(args.warmup), "--steps", str(args.steps),
                                  "--pause", str(args.pause)],
                                 env=env, capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parents[1])
            rows[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"case {args.case}: {args.rounds} rounds x {args.steps} steps, {args.pause:g} s idle before each; per step")
    print(f"  {'':32s} {'median s':>8s} {'mean s':>7s} {'user s':>7s} {'sys s':>6s} {'sys>1s':>7s} "
          f"{'faults':>8s} {'peak RSS GB (warm-up / end)':>28s}")
    for name, rs in rows.items():
        every = {k: [v for x in rs for v in x[k]] for k in ("wall", "user", "sys", "faults")}
        stalled = sum(s > 1.0 for s in every["sys"])
        print(f"  {name:32s} {statistics.median(every['wall']):8.3f} {statistics.fmean(every['wall']):7.3f} "
              f"{statistics.median(every['user']):7.3f} {statistics.median(every['sys']):6.3f} "
              f"{stalled:3d}/{len(every['sys']):<3d} {statistics.median(every['faults']):8.0f} "
              f"{statistics.median(x['rss_warm_gb'] for x in rs):19.2f} / {statistics.median(x['rss_gb'] for x in rs):.2f}")
    names = list(table)
    for name in names[1:]:
        for ref in names[:names.index(name)]:
            speed = [statistics.fmean(b["wall"]) / statistics.fmean(h["wall"]) for b, h in zip(rows[ref], rows[name])]
            same = all(b["losses"] == h["losses"] for b, h in zip(rows[ref], rows[name]))
            print(f"  {name} over {ref}: {statistics.median(speed):.3f}x faster by each round's mean step "
                  f"(rounds {min(speed):.3f}-{max(speed):.3f}); losses bit-identical: {same}")


if __name__ == "__main__":
    main()
