"""Does RePo help? RoPE vs NoPE vs RePo on synthetic tasks, through the project's trainer.

    python -m experiments.repo_toy [--quick | --plan P] [--jobs N] [--seeds S ...]
        [--matmul-precision highest] [--out DIR] [--work DIR] [--report-only]

Trains tiny OLMo-2 models (`train.py`'s `repo_jax.train.run`, `data.source: synthetic`,
loss on answer tokens only) on a mix of noisy associative recall, structured lookup
and induction, in six runs per seed with the same number of training examples for
every final model:

  rope       all layers RoPE, from scratch, `steps`
  nope       all layers NoPE, from scratch, `steps`
  repo       RePo from `repo_start` (RoPE below), from scratch, `steps`
  base       all RoPE, `steps // 2` (the paper's protocol, stage 1)
  cont_rope  `init_from` base, all RoPE, the other half of `steps` (the control)
  cont_repo  `init_from` base, RePo maps added from `repo_start` (fresh), the same half

Each run scores its final checkpoint with `repo_jax.eval.synthetic` (what
`python -m repo_jax.eval --task synthetic` runs) and writes one JSON to
OUT/runs/ARM-sSEED.json, failed runs included. A rerun skips finished runs of the
same plan and retries failed ones, so partial runs, also from other machines, merge
by copying their JSONs into OUT/runs. The report (OUT/results.md, OUT/*.png,
OUT/summary.json, OUT/command.md) is rebuilt from every JSON of the plan.

Runs go in parallel as subprocesses (`--jobs`), each with XLA on one thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
ARMS = ("rope", "nope", "repo", "base", "cont_rope", "cont_repo")
LABELS = {"rope": "RoPE", "nope": "NoPE", "repo": "RePo (from layer {start})",
          "base": "RoPE, half the steps (protocol stage 1)",
          "cont_rope": "RoPE -> RoPE continuation (control)",
          "cont_repo": "RoPE -> RePo continuation (protocol)"}
# The arms compared at the same budget, in table order; `base` is reported apart.
FINAL_ARMS = ("rope", "nope", "repo", "cont_rope", "cont_repo")
STYLES = {"rope": ("C0", "o"), "nope": ("C7", "s"), "repo": ("C3", "^"), "base": ("C1", "x"),
          "cont_rope": ("C2", "v"), "cont_repo": ("C4", "D")}


@dataclass(frozen=True)
class Plan:
    """Everything that decides the results; its hash tags every run JSON."""
    name: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    seq_len: int
    batch_size: int
    steps: int                      # per final model; base and continuations split it
    lr: float
    warmup: int
    seeds: tuple[int, ...]
    repo_start: int
    rope_theta: float
    eval_examples: int              # per task and setting
    eval_every: int
    synthetic: dict = field(default_factory=dict)   # data.synthetic overrides

    @property
    def tag(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# Design 3. Design 1 (one query per example, 16 x 64 tokens, 800 steps) learned nothing in
# any arm (docs/experiments/design1/); design 2 (4 queries, 32 x 128 tokens) was still at
# chance after 400 steps. A sweep of the all-RoPE arm alone (docs/experiments/README.md)
# showed that supervised queries per step decide whether it learns: 64 examples of 64
# tokens with 4 queries each learned in about 1000 steps. About an hour on 2 CPU cores.
FULL = Plan(name="full", layers=4, hidden=128, heads=4, intermediate=256, seq_len=64,
            batch_size=64, steps=1200, lr=3e-3, warmup=50, seeds=(0, 1, 2), repo_start=1,
            rope_theta=10000.0, eval_examples=64, eval_every=150,
            synthetic={"num_pairs": 4, "num_queries": 4, "max_rows": 8})
QUICK = Plan(name="quick", layers=2, hidden=32, heads=2, intermediate=64, seq_len=32,
             batch_size=4, steps=4, lr=3e-3, warmup=1, seeds=(0,), repo_start=1,
             rope_theta=10000.0, eval_examples=4, eval_every=2,
             synthetic={"num_pairs": 2, "num_queries": 2, "max_rows": 4})
# The same models and tasks trained 4x longer (`--plan long`).
LONG = dataclasses.replace(FULL, name="long", steps=4800, eval_every=600)
PLANS = {"full": FULL, "quick": QUICK, "long": LONG}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def schemes(plan: Plan, arm: str) -> list[str]:
    if arm == "nope":
        return ["nope"] * plan.layers
    if arm in ("repo", "cont_repo"):
        return ["rope"] * plan.repo_start + ["repo"] * (plan.layers - plan.repo_start)
    return ["rope"] * plan.layers


def train_config(plan: Plan, arm: str, seed: int, work: Path):
    """The TrainConfig of one run, built from the same typed keys train.py's YAML uses."""
    from repo_jax.config import TrainConfig

    half = plan.steps // 2
    steps = {"base": half, "cont_rope": plan.steps - half, "cont_repo": plan.steps - half}
    cont = arm.startswith("cont_")
    return TrainConfig.from_dict({
        "model": {"preset": "tiny", "vocab_size": plan.synthetic.get("vocab_size", 64),
                  "hidden_size": plan.hidden, "intermediate_size": plan.intermediate,
                  "num_hidden_layers": plan.layers, "num_attention_heads": plan.heads,
                  "num_key_value_heads": plan.heads, "rope_theta": plan.rope_theta,
                  "max_position_embeddings": 4 * plan.seq_len,
                  "original_max_position_embeddings": plan.seq_len,
                  "layer_schemes": schemes(plan, arm), "eos_token_id": 0, "pad_token_id": 0},
        # Continuations read fresh examples (stream 2), not the ones base already saw.
        "data": {"source": "synthetic", "seq_len": plan.seq_len,
                 "synthetic": {**plan.synthetic, "seed": 2 if cont else 0, "eval_seed": 1}},
        "optimizer": {"lr": plan.lr},
        "schedule": {"kind": "linear", "warmup_steps": plan.warmup, "final_fraction": 0.1},
        # Saves every eval so that a killed run resumes without losing much.
        "checkpoint": {"every": plan.eval_every * 2, "keep": 1, "async_save": False},
        "steps": steps.get(arm, plan.steps), "seed": seed, "batch_size": plan.batch_size,
        "run_dir": str(work / plan.tag / run_name(arm, seed)),
        "init_from": str(work / plan.tag / run_name("base", seed)) if cont else "",
        "log_every": max(1, plan.eval_every // 4), "eval_every": plan.eval_every,
        "eval_batches": 4, "compilation_cache_dir": str(work / "xla_cache"),
        "tensorboard": False, "progress": False,
    })


# ---- one run (in its own process) --------------------------------------------

def positions_example(syn_cfg, seed: int = 9999):
    """The example every RePo run draws its positions for: recall at noise 0.3."""
    from repo_jax.data import synthetic

    ex = synthetic.recall(np.random.default_rng([seed]), syn_cfg, 0.3)
    return ex.tokens


def position_stats(z: np.ndarray, tokens: np.ndarray, key_len: int) -> dict:
    """Monotonic? dense? relevant tokens close? for one head's positions z [T]."""
    from repo_jax.data.synthetic import KV, QUERY

    t = len(z)
    rank = np.argsort(np.argsort(z))
    spearman = float(np.corrcoef(rank, np.arange(t))[0, 1]) if np.ptp(z) > 0 else 0.0
    q = int(np.flatnonzero(tokens == QUERY)[-1])
    asked = tokens[q + 1:q + 1 + key_len]
    # The pair that holds the answer: the asked key followed by ':' in the context.
    where = [i for i in range(1, q - key_len) if np.array_equal(tokens[i:i + key_len], asked)
             and tokens[i + key_len] == KV]
    pair = np.arange(where[0], where[0] + key_len) if where else np.arange(0)
    query = np.arange(q + 1, q + 1 + key_len)
    spread = float(np.median(np.abs(z[:, None] - z[None, :])))
    gap = float(np.mean(np.abs(z[query][:, None] - z[pair][None, :]))) if len(pair) else float("nan")
    return {"spearman": spearman, "increasing": float(np.mean(np.diff(z) > 0)),
            "range": float(np.ptp(z)), "range_over_length": float(np.ptp(z) / (t - 1)),
            "distinct": int(len(np.unique(np.round(z / max(np.ptp(z), 1e-9) * 50)))),
            "query_to_pair_over_median": gap / spread if spread > 0 else float("nan")}


def run_job(plan: Plan, arm: str, seed: int, work: Path) -> dict:
    import jax

    from repo_jax import load_model
    from repo_jax.eval import synthetic
    from repo_jax.positions import learned_positions
    from repo_jax.train import run

    cfg = train_config(plan, arm, seed, work)
    t0 = time.perf_counter()
    summary = run(cfg)
    train_s = time.perf_counter() - t0
    model = load_model(cfg.run_dir)

    def yarn(factor: float):
        return load_model(cfg.run_dir, rope_scaling_factor=factor,
                          original_max_position_embeddings=plan.seq_len)

    t1 = time.perf_counter()
    rows = synthetic.evaluate(model, cfg.data.synthetic, plan.seq_len, plan.eval_examples,
                              yarn_model=yarn)
    eval_s = time.perf_counter() - t1
    curve = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    record = {"run": run_name(arm, seed), "arm": arm, "seed": seed, "status": "ok",
              "plan": plan.tag, "train_s": train_s, "eval_s": eval_s, "steps": summary["step"],
              "final": summary["last"], "eval": rows,
              "curve": [{k: c.get(k) for k in ("step", "loss", "eval_loss", "tokens_per_sec")}
                        for c in curve],
              "config": cfg.to_dict(), "jax": jax.__version__, "platform": jax.devices()[0].platform,
              "matmul_precision": jax.config.jax_default_matmul_precision}
    if cfg.model.repo_layers:
        from repo_jax.data.synthetic import token_names

        tokens = positions_example(cfg.data.synthetic)
        layers = {}
        for layer in cfg.model.repo_layers:
            z = learned_positions(model, tokens.tolist(), layer)
            layers[str(layer)] = {"positions": z.tolist(),
                                  "stats": [position_stats(z[h], tokens, cfg.data.synthetic.key_len)
                                            for h in range(z.shape[0])]}
        record["positions"] = {"tokens": token_names(tokens), "layers": layers}
    return record


# ---- the driver -------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    from repo_jax.cli import write_atomic

    write_atomic(path, json.dumps(data, indent=1))


def read_runs(out: Path, plan: Plan) -> dict[str, dict]:
    runs = {}
    for path in sorted((out / "runs").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("plan") == plan.tag:
            runs[data["run"]] = data
    return runs


def launch(plan: Plan, arm: str, seed: int, work: Path, out: Path, base: Future | None) -> dict:
    """Run one job in a subprocess; its JSON (ok or failed) is in OUT/runs afterwards."""
    name = run_name(arm, seed)
    path = out / "runs" / f"{name}.json"
    if base is not None:
        base.result()
        base_record = json.loads((out / "runs" / f"{run_name('base', seed)}.json").read_text())
        if base_record.get("status") != "ok":
            record = {"run": name, "arm": arm, "seed": seed, "status": "failed",
                      "plan": plan.tag, "error": "its base run failed; not started"}
            write_json(path, record)
            return record
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD).strip()}
    cmd = [sys.executable, "-m", "experiments.repo_toy", "--plan", plan.name, "--job", arm,
           "--seed", str(seed), "--work", str(work), "--out", str(out)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if rc == 0 and path.is_file():
        record = json.loads(path.read_text())
        record["wall_s"] = wall
    else:
        tail = log.read_text().splitlines()[-15:] if log.is_file() else []
        record = {"run": name, "arm": arm, "seed": seed, "status": "failed", "plan": plan.tag,
                  "rc": rc, "wall_s": wall, "error": "\n".join(tail)}
    write_json(path, record)
    return record


def run_all(plan: Plan, jobs: int, work: Path, out: Path, seeds: tuple[int, ...] | None = None) -> None:
    from tqdm import tqdm

    done = {k for k, v in read_runs(out, plan).items() if v.get("status") == "ok"}
    # Bases first so that no continuation waits behind work that has not started.
    order = sorted(((a, s) for s in (seeds or plan.seeds) for a in ARMS),
                   key=lambda x: (x[0] != "base", x[0].startswith("cont_"), x[1]))
    todo = [(a, s) for a, s in order if run_name(a, s) not in done]
    print(f"plan {plan.name} ({plan.tag}): {len(done)} run(s) already done, {len(todo)} to run, "
          f"{jobs} at a time; logs in {work / 'logs'}", flush=True)
    if not todo:
        return
    futures: dict[tuple[str, int], Future] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for arm, seed in todo:
            base = futures.get(("base", seed)) if arm.startswith("cont_") else None
            futures[(arm, seed)] = pool.submit(launch, plan, arm, seed, work, out, base)
        with tqdm(total=len(todo), desc="runs", unit="run") as bar:
            pending = set(futures.values())
            while pending:
                finished = {f for f in pending if f.done()}
                for f in finished:
                    r = f.result()
                    bar.write(f"{r['run']}: {r['status']} ({r.get('wall_s', 0):.0f}s)")
                    bar.update(1)
                pending -= finished
                time.sleep(0.5)


# ---- the report -------------------------------------------------------------

def cells(record: dict) -> dict[str, float]:
    """Flat metric names -> values of one run: `recall@0.4`, `induction@2x+yarn`, ..."""
    out = {}
    for row in record.get("eval", []):
        if row["task"] == "recall":
            key = f"recall@{row['noise']}"
        elif row["task"] == "lookup":
            key = f"lookup@{row['rows']}rows"
        else:
            key = f"induction@{row['multiple']}x" + ("+yarn" if row["yarn"] else "")
        out[key] = row["accuracy"]
        out[key + ":loss"] = row["answer_loss"]
    if record.get("final", {}).get("eval_loss") is not None:
        out["eval_loss"] = record["final"]["eval_loss"]
    return out


def aggregate(runs: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """arm -> metric -> {mean, std, n, values} over the arm's successful seeds."""
    out: dict[str, dict[str, dict]] = {}
    for arm in ARMS:
        ok = [r for r in runs.values() if r["arm"] == arm and r["status"] == "ok"]
        by_metric: dict[str, list[float]] = {}
        for r in sorted(ok, key=lambda r: r["seed"]):
            for k, v in cells(r).items():
                by_metric.setdefault(k, []).append(v)
        out[arm] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                        "n": len(v), "values": v} for k, v in by_metric.items()}
    return out


def _fmt(cell: dict | None, pct: bool = True) -> str:
    if not cell:
        return "-"
    if pct:
        return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def table(agg: dict, plan: Plan, arms: tuple[str, ...]) -> str:
    metrics = sorted({k for a in arms for k in agg[a] if ":" not in k and k != "eval_loss"},
                     key=_metric_order)
    groups = {}
    for m in metrics:
        groups.setdefault(m.split("@")[0], []).append(m)
    lines = []
    for task, ms in groups.items():
        lines += [f"**{task}** (exact-match accuracy %, mean ± std over seeds)", "",
                  "| arm | n | " + " | ".join(m.split("@")[1] for m in ms) + " |",
                  "|---|---|" + "---|" * len(ms)]
        for a in arms:
            n = max((agg[a][m]["n"] for m in ms if m in agg[a]), default=0)
            lines.append(f"| {LABELS[a].format(start=plan.repo_start)} | {n} | "
                         + " | ".join(_fmt(agg[a].get(m)) for m in ms) + " |")
        lines.append("")
    lines += ["**answer-token loss** on the held-out mix at the end of training (nats)", "",
              "| arm | n | eval loss |", "|---|---|---|"]
    for a in arms:
        cell = agg[a].get("eval_loss")
        lines.append(f"| {LABELS[a].format(start=plan.repo_start)} | {cell['n'] if cell else 0} | "
                     f"{_fmt(cell, pct=False)} |")
    return "\n".join(lines) + "\n"


def _metric_order(m: str):
    task, _, setting = m.partition("@")
    num = float("".join(c for c in setting.split("x")[0].split("rows")[0] if c in "0123456789.") or 0)
    return (("recall", "lookup", "induction").index(task), "yarn" in setting, num)


def _errorbar(ax, agg, arm, keys, xs, plan, **kw):
    cells_ = [agg[arm].get(k) for k in keys]
    if not any(cells_):
        return
    x = [x for x, c in zip(xs, cells_) if c]
    y = [100 * c["mean"] for c in cells_ if c]
    e = [100 * c["std"] for c in cells_ if c]
    color, marker = STYLES[arm]
    ax.errorbar(x, y, yerr=e, color=color, marker=marker, capsize=3,
                label=kw.pop("label", LABELS[arm].format(start=plan.repo_start)), **kw)


def plots(agg: dict, runs: dict, plan: Plan, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repo_jax.eval.synthetic import LENGTH_MULTIPLES, NOISE_RATIOS, TABLE_ROWS

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm in FINAL_ARMS:
        _errorbar(ax, agg, arm, [f"recall@{n}" for n in NOISE_RATIOS], NOISE_RATIOS, plan)
    ax.set(xlabel="noise ratio (share of distractor tokens in the context)",
           ylabel="exact match (%)", title="Noisy associative recall", ylim=(-3, 103))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_noise.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for yarn, ax in zip((False, True), axes):
        for arm in FINAL_ARMS:
            keys = [f"induction@{m}x" + ("+yarn" if yarn and m > 1 else "") for m in LENGTH_MULTIPLES]
            _errorbar(ax, agg, arm, keys, [m * plan.seq_len for m in LENGTH_MULTIPLES], plan)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(xlabel=f"sequence length (trained at {plan.seq_len})",
               title="Induction past the trained length" + (", YaRN" if yarn else ", no YaRN"),
               ylim=(-3, 103))
        ax.set_xticks([m * plan.seq_len for m in LENGTH_MULTIPLES],
                      [str(m * plan.seq_len) for m in LENGTH_MULTIPLES])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match (%)")
    axes[0].legend(fontsize=7)
    save(fig, "accuracy_vs_length.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm in FINAL_ARMS:
        _errorbar(ax, agg, arm, [f"lookup@{r}rows" for r in TABLE_ROWS], TABLE_ROWS, plan)
    ax.set(xlabel="table rows (4 columns)", ylabel="exact match (%)", title="Structured lookup",
           ylim=(-3, 103))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_rows.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    half = plan.steps // 2
    for r in sorted(runs.values(), key=lambda r: (ARMS.index(r["arm"]), r["seed"])):
        if r["status"] != "ok":
            continue
        pts = [(c["step"] + (half if r["arm"].startswith("cont_") else 0), c["eval_loss"])
               for c in r["curve"] if c.get("eval_loss") is not None]
        if pts:
            color, marker = STYLES[r["arm"]]
            ax.plot(*zip(*pts), color=color, marker=marker, ms=3, lw=1, alpha=0.8,
                    label=LABELS[r["arm"]].format(start=plan.repo_start) if r["seed"] == min(plan.seeds) else None)
    ax.set(xlabel="training step (continuations drawn after their base)",
           ylabel="held-out answer-token loss", title="Learning curves (every seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "learning_curves.png")

    pictures = [r for r in runs.values() if r["status"] == "ok" and "positions" in r]
    if pictures:
        from repo_jax.positions import draw

        for arm in ("repo", "cont_repo"):
            mine = sorted((r for r in pictures if r["arm"] == arm), key=lambda r: r["seed"])
            if not mine:
                continue
            rec = mine[0]
            layer = min(rec["positions"]["layers"], key=int)
            z = np.asarray(rec["positions"]["layers"][layer]["positions"])
            heads = list(range(z.shape[0]))
            png = draw(z, rec["positions"]["tokens"], heads, int(layer),
                       (1500, 260 * int(np.ceil(len(heads) / np.ceil(np.sqrt(len(heads))))) + 150))
            name = f"positions_{arm}_layer{layer}.png"
            (out / name).write_bytes(png)
            written.append(name)
    return written


def position_summary(runs: dict) -> dict:
    """Per arm and RePo layer: each statistic's mean over heads and seeds (and its range)."""
    out: dict[str, dict] = {}
    for r in runs.values():
        if r["status"] != "ok" or "positions" not in r:
            continue
        for layer, data in r["positions"]["layers"].items():
            slot = out.setdefault(r["arm"], {}).setdefault(layer, {})
            for stats in data["stats"]:
                for k, v in stats.items():
                    slot.setdefault(k, []).append(v)
    return {arm: {layer: {k: {"mean": float(np.nanmean(v)), "min": float(np.nanmin(v)),
                              "max": float(np.nanmax(v)), "n": len(v)} for k, v in stats.items()}
                  for layer, stats in layers.items()} for arm, layers in out.items()}


def report(plan: Plan, out: Path, argv: list[str], wall: float | None) -> None:
    runs = read_runs(out, plan)
    agg = aggregate(runs)
    positions = position_summary(runs)
    written = plots(agg, runs, plan, out)
    lines = [f"# Results of plan `{plan.name}` ({plan.tag})", "",
             "Written by `python -m experiments.repo_toy`; see command.md for the exact command "
             "and configuration.", "", "## Same budget for every model", "",
             table(agg, plan, FINAL_ARMS), "## Protocol stage 1 (half the steps)", "",
             table(agg, plan, ("base",)), "## Learned positions (first RePo layer)", "",
             "| arm | layer | Spearman(position, index) | share of steps increasing | "
             "range / (T-1) | query-to-pair distance / median distance |", "|---|---|---|---|---|---|"]
    for arm, layers in positions.items():
        for layer, s in sorted(layers.items(), key=lambda x: int(x[0])):
            lines.append(f"| {arm} | {layer} | {s['spearman']['mean']:.2f} "
                         f"[{s['spearman']['min']:.2f}, {s['spearman']['max']:.2f}] | "
                         f"{s['increasing']['mean']:.2f} | {s['range_over_length']['mean']:.3f} | "
                         f"{s['query_to_pair_over_median']['mean']:.2f} |")
    lines += ["", "## Every run", "", "| run | status | steps | train s | eval s | wall s | note |",
              "|---|---|---|---|---|---|---|"]
    for name in sorted(runs, key=lambda n: (ARMS.index(runs[n]["arm"]), runs[n]["seed"])):
        r = runs[name]
        note = r.get("error", "").splitlines()[-1][:80] if r["status"] != "ok" and r.get("error") else ""
        lines.append(f"| {name} | {r['status']} | {r.get('steps', '-')} | {r.get('train_s', 0):.0f} | "
                     f"{r.get('eval_s', 0):.0f} | {r.get('wall_s', 0):.0f} | {note} |")
    missing = [run_name(a, s) for s in plan.seeds for a in ARMS if run_name(a, s) not in runs]
    if missing:
        lines += ["", f"Not run (no JSON): {', '.join(missing)}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    write_json(out / "summary.json", {"plan": dataclasses.asdict(plan), "tag": plan.tag,
                                      "aggregate": agg, "positions": positions,
                                      "runs": {k: v["status"] for k, v in runs.items()},
                                      "files": written})
    print(f"wrote {out / 'results.md'}, summary.json, {', '.join(written)}")
    if wall is None and (out / "command.md").is_file():
        return  # a rebuilt report keeps the record of the invocation that ran the runs
    import jax

    config = train_config(plan, "cont_repo", plan.seeds[0], Path("WORK")).to_dict()
    (out / "command.md").write_text("\n".join([
        f"# How `{plan.name}` was produced", "", "```", "python -m experiments.repo_toy "
        + " ".join(shlex.quote(a) for a in argv), "```", "",
        f"- plan ({plan.tag}): `{json.dumps(dataclasses.asdict(plan))}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
        f"- wall time of the last invocation: {wall:.0f} s" if wall is not None else
        "- report rebuilt from existing run JSONs (--report-only)",
        "", "The TrainConfig of one run (cont_repo, first seed; WORK = --work):", "", "```yaml",
        __import__("yaml").safe_dump(config, sort_keys=False).rstrip(), "```", ""]))
    print(f"wrote {out / 'command.md'}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.repo_toy",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke-test plan (about a minute)")
    parser.add_argument("--plan", choices=sorted(PLANS),
                        help="full (default), quick (= --quick), or long (4x the steps; an accelerator)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one XLA thread each)")
    parser.add_argument("--out", help="results (default: docs/experiments, or runs/repo_toy_quick/out)")
    parser.add_argument("--work", help="run directories and logs (default: runs/repo_toy[_quick])")
    parser.add_argument("--matmul-precision", choices=("default", "high", "highest"),
                        help="jax_default_matmul_precision of every run (highest: float32 "
                             "matmuls on GPUs, no TF32)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="run only these seeds of the plan (the others can run elsewhere; "
                             "their JSONs merge in OUT/runs)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from OUT/runs/*.json without running anything")
    parser.add_argument("--job", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = PLANS[args.plan or ("quick" if args.quick else "full")]
    work = Path(args.work or f"runs/repo_toy{'' if plan.name == 'full' else '_' + plan.name}").resolve()
    out = Path(args.out or (f"docs/experiments{'' if plan.name == 'full' else '/' + plan.name}"
                            if plan.name != "quick" else work / "out")).resolve()
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: must be at least 1", file=sys.stderr)
        return 2
    if args.seeds and not set(args.seeds) <= set(plan.seeds):
        print(f"error: --seeds {' '.join(map(str, args.seeds))}: the plan {plan.name} has seeds "
              f"{' '.join(map(str, plan.seeds))}; pick among them", file=sys.stderr)
        return 2
    if args.matmul_precision:  # read by JAX in every run's subprocess
        os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = args.matmul_precision
    if args.job:
        record = run_job(plan, args.job, args.seed, work)
        write_json(out / "runs" / f"{record['run']}.json", record)
        return 0
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.report_only:
        run_all(plan, args.jobs, work, out, tuple(args.seeds or ()))
    report(plan, out, argv, None if args.report_only else time.perf_counter() - t0)
    failed = [k for k, v in read_runs(out, plan).items() if v["status"] != "ok"]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(sorted(failed))} (see results.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
