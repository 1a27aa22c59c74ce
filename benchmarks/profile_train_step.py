"""Where a train step's time goes: per-op time of the compiled step (XLA:CPU thunk events
from `jax.profiler`), next to the step's `cost_analysis()`, for a case of bench_train.

    python -m benchmarks.profile_train_step transformer [--repo] [--steps 2 --top 25]
    python -m benchmarks.profile_train_step long --vs-rope [--steps 3]

Each line: ms per step, share of the summed op time, calls per step, the HLO
instruction and its kind and shape. Compilation is done before tracing starts.

`--vs-rope` compiles the case's RoPE and RePo steps in one process, profiles them in
alternation and prints the ops that only the RePo step has (by fusion kind and output
shape, summed over threads) and the ops it runs more often: RePo's own cost, op by op,
which whole-step wall times on a shared VM (+-3% between identical runs) cannot show.
Matmuls are keyed by their operand shapes too. Ops whose key the RoPE step also has are
listed apart, at their average cost, which is only a bound for RePo's extra calls of them;
then the shared ops whose time differs most, which on a shared VM is mostly the host's
speed between the two steps (their sum is printed to show how much).
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time


def _compiled(case: str, repo: bool):
    """(compiled step, [state], batch, {HLO instruction: "kind shape"}, cost analysis)."""
    import numpy as np

    from benchmarks.bench_train import CASES, jax_train_step, model_config
    from repo_jax.config import OptimizerConfig

    c = CASES[case]
    tokens = np.random.default_rng(0).integers(0, c.vocab, (c.batch, c.seq)).astype(np.int32)
    step, state, batch = jax_train_step(model_config(c, repo), tokens, OptimizerConfig(lr=1e-3), 1e-5)
    compiled = step.lower(state[0], batch).compile()
    kinds, shapes = {}, {}
    for line in compiled.as_text().splitlines():
        # A tuple-shaped result (multi-output fusions, conditionals) has spaces in its shape.
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(([^()]*)\)", line)
        if not m:
            continue
        shapes[m.group(1)] = m.group(2)
        # A conditional's or loop's event spans the ops inside it, which have their own.
        if m.group(3) not in ("conditional", "while", "call"):
            kinds[m.group(1)] = f"{m.group(3)} {m.group(2)[:48]}"
            # Matmuls are told apart by their operands too: f_phi's input gradient has the
            # output shape of the model's own [B*T, d] dots but a K of d/4.
            if m.group(3) == "dot" or "ynn" in m.group(1):
                operands = [shapes.get(o, "?") for o in re.findall(r"%([\w.\-]+)", m.group(4))]
                kinds[m.group(1)] += f" <- {', '.join(operands)}"
    state[0], metrics = compiled(state[0], batch)  # the first call's set-up, outside the trace
    float(metrics["loss"])
    return compiled, state, batch, kinds, compiled.cost_analysis()


def _profile(compiled, state, batch, kinds, steps: int, total, calls) -> float:
    """Runs `steps` steps under the profiler, adds each HLO op's ms per step to `total` and
    its executions to `calls`; returns the wall time per step."""
    import jax
    from jax._src.lib import _profile_data  # reader of the profiler's XSpace

    out = tempfile.mkdtemp()
    with jax.profiler.trace(out):
        t = time.perf_counter()
        for _ in range(steps):
            state[0], metrics = compiled(state[0], batch)
            float(metrics["loss"])
        wall = (time.perf_counter() - t) / steps
    data = _profile_data.ProfileData.from_file(glob.glob(out + "/**/*.xplane.pb", recursive=True)[0])
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for e in line.events:
                if e.name in kinds:  # HLO thunks only (not runtime or Python events)
                    total[e.name] += e.duration_ns / 1e6 / steps
                    calls[e.name] += 1
    return wall


def _kind(name: str, kinds: dict) -> str:
    return "dot (ynn/eigen)" if "ynn" in name or kinds[name].startswith("dot") else re.sub(r"[._]\d+$", "", name)


def _one(a) -> None:
    compiled, state, batch, kinds, cost = _compiled(a.case, a.repo)
    total, calls = collections.Counter(), collections.Counter()
    wall = _profile(compiled, state, batch, kinds, a.steps, total, calls)
    ops = sum(total.values())
    print(f"{a.case}{' (RePo)' if a.repo else ''}: cost_analysis {cost.get('flops', 0):.3e} FLOPs, "
          f"{cost.get('bytes accessed', 0):.3e} bytes, {cost.get('transcendentals', 0):.3e} transcendentals")
    print(f"wall {wall:.3f} s/step; HLO ops {ops / 1e3:.3f} s/step summed over threads, "
          f"{sum(calls.values()) // a.steps} op executions per step")
    for name, ms in total.most_common(a.top):
        print(f"{ms:9.1f} ms {ms / ops:6.1%} x{calls[name] // a.steps:<3d} {name:32s} {kinds[name]}")
    by_kind = collections.Counter()
    for name, ms in total.items():
        by_kind[_kind(name, kinds)] += ms
    print("by kind:")
    for k, ms in by_kind.most_common(12):
        print(f"  {ms:9.1f} ms {ms / ops:6.1%} {k}")


def _vs_rope(a) -> None:
    sides = {repo: _compiled(a.case, repo) for repo in (False, True)}
    per_sig = {repo: (collections.Counter(), collections.Counter()) for repo in sides}
    for r in range(a.steps):  # one profiled step per side per round, order alternating
        for repo in ((False, True) if r % 2 == 0 else (True, False)):
            compiled, state, batch, kinds, _ = sides[repo]
            total, calls = collections.Counter(), collections.Counter()
            _profile(compiled, state, batch, kinds, 1, total, calls)
            ms, n = per_sig[repo]
            for name, t in total.items():
                sig = f"{_kind(name, kinds).split(' ')[0]} {kinds[name].split(' ', 1)[1]}"
                ms[sig] += t / a.steps
                n[sig] += calls[name]
    (ms0, n0), (ms1, n1) = per_sig[False], per_sig[True]
    rope_total = sum(ms0.values())
    own = {s: t for s, t in ms1.items() if s not in ms0}
    more = {s: ms1[s] / n1[s] * (n1[s] - n0[s]) for s in ms1 if s in ms0 and n1[s] > n0[s]}
    print(f"{a.case}: op time per step summed over threads, RoPE {rope_total:.0f} ms, "
          f"RePo {sum(ms1.values()):.0f} ms ({a.steps} profiled steps each, alternating)")
    # What XLA's cost model expects: where the extra bytes outgrow the extra FLOPs, the
    # memory-bound ops (RePo layers' rotations read per-head tables) cost more than the FLOP ratio says.
    (c0, c1) = (sides[False][4], sides[True][4])
    print(f"cost_analysis, RePo / RoPE: FLOPs {c1.get('flops', 0) / c0.get('flops', 1):.4f}, "
          f"bytes accessed {c1.get('bytes accessed', 0) / c0.get('bytes accessed', 1):.4f}, "
          f"transcendentals {c1.get('transcendentals', 0) / max(c0.get('transcendentals', 0), 1):.4f}")
    print("ops only the RePo step has (ms per step, calls per step, kind and shape):")
    for s, t in sorted(own.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{t:9.1f} ms x{n1[s] // a.steps:<3d} {s}")
    print(f"  total {sum(own.values()):.1f} ms = {sum(own.values()) / rope_total:.2%} of the RoPE step's op time")
    print("ops both have, run more often by RePo (extra calls at the average cost of all calls):")
    for s, t in sorted(more.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{t:9.1f} ms +{(n1[s] - n0[s]) // a.steps:<3d} {s}")
    # Same key and calls, but RePo's version can read more: a RePo layer's rotation takes
    # per-head tables. Noisy op by op (the host's speed), so only the largest are shown.
    slower = {s: ms1[s] - ms0[s] for s in ms1 if s in ms0 and n1[s] == n0[s]}
    print(f"ops both have as often, largest differences in time (RePo - RoPE; all such ops: "
          f"{sum(slower.values()):+.1f} ms):")
    for s, t in sorted(slower.items(), key=lambda kv: -abs(kv[1]))[:a.top]:
        print(f"{t:+9.1f} ms x{n1[s] // a.steps:<3d} {s}  (RoPE {ms0[s]:.1f} ms)")


def main() -> None:
    from benchmarks.bench_train import CASES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--repo", action="store_true", help="the case's RePo model")
    ap.add_argument("--vs-rope", action="store_true", help="RePo's own ops against the RoPE step")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    _vs_rope(a) if a.vs_rope else _one(a)


if __name__ == "__main__":
    main()
