"""Where a train step's time goes: per-op time of the compiled step (XLA:CPU thunk events
from `jax.profiler`), next to the step's `cost_analysis()`, for a case of bench_train.

    python -m benchmarks.profile_train_step transformer [--repo] [--steps 2 --top 25]

Each line: ms per step, share of the summed op time, calls per step, the HLO
instruction and its kind and shape. Compilation is done before tracing starts.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time


def main() -> None:
    from benchmarks.bench_train import CASES, jax_train_step, model_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--repo", action="store_true", help="the case's RePo model")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()

    import jax
    import numpy as np
    from jax._src.lib import _profile_data  # reader of the profiler's XSpace

    from repo_jax.config import OptimizerConfig

    c = CASES[a.case]
    tokens = np.random.default_rng(0).integers(0, c.vocab, (c.batch, c.seq)).astype(np.int32)
    step, state, batch = jax_train_step(model_config(c, a.repo), tokens, OptimizerConfig(lr=1e-3), 1e-5)
    compiled = step.lower(state[0], batch).compile()
    hlo, cost = compiled.as_text(), compiled.cost_analysis()
    kinds = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if m:
            kinds[m.group(1)] = f"{m.group(3)} {m.group(2)[:48]}"
    state[0], m = step(state[0], batch)  # compile outside the trace
    float(m["loss"])
    out = tempfile.mkdtemp()
    with jax.profiler.trace(out):
        t = time.perf_counter()
        for _ in range(a.steps):
            state[0], m = step(state[0], batch)
            float(m["loss"])
        wall = (time.perf_counter() - t) / a.steps
    data = _profile_data.ProfileData.from_file(glob.glob(out + "/**/*.xplane.pb", recursive=True)[0])
    total, calls = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for e in line.events:
                if e.name in kinds:  # HLO thunks only (not runtime or Python events)
                    total[e.name] += e.duration_ns / 1e6 / a.steps
                    calls[e.name] += 1
    ops = sum(total.values())
    print(f"{a.case}{' (RePo)' if a.repo else ''}: cost_analysis {cost.get('flops', 0):.3e} FLOPs, "
          f"{cost.get('bytes accessed', 0):.3e} bytes, {cost.get('transcendentals', 0):.3e} transcendentals")
    print(f"wall {wall:.3f} s/step; HLO ops {ops / 1e3:.3f} s/step summed over threads, "
          f"{sum(calls.values()) // a.steps} op executions per step")
    for name, ms in total.most_common(a.top):
        print(f"{ms:9.1f} ms {ms / ops:6.1%} x{calls[name] // a.steps:<3d} {name:32s} {kinds[name]}")
    by_kind = collections.Counter()
    for name, ms in total.items():
        by_kind["dot (ynn/eigen)" if "ynn" in name or kinds[name].startswith("dot") else
                re.sub(r"[._]\d+$", "", name)] += ms
    print("by kind:")
    for k, ms in by_kind.most_common(12):
        print(f"  {ms:9.1f} ms {ms / ops:6.1%} {k}")


if __name__ == "__main__":
    main()
