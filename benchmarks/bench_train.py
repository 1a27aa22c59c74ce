"""Training-step throughput: repo-jax vs upstream PyTorch, side by side, one run.

For each named case, on the same token batch and the same starting weights, float32:
  * our jitted step (forward, backward, CE + z-loss, clipping, AdamW) on one device,
  * upstream `transformers.Olmo2ForCausalLM` + `torch.optim.AdamW` doing the same, in a
    process of its own, on glibc's malloc with its defaults, as PyTorch's users run it
    (not our huge-page tunable or jemalloc, repo_jax/host_memory.py, which both slowed
    PyTorch's step: `_glibc_env`),
  * our step with RePo layers (upstream has no RePo).
Ours and PyTorch's are timed interleaved (each in turn runs `--burst` steps, the first
untimed and the best of the rest counted, `--reps` rounds, the order reversed every other
round) so that load and drift hit both alike, and within a round the best step counts
because on this VM one step in two or three could take seconds of system time for the
same work (repo_jax/host_memory.py). Then, with PyTorch's process stopped, ours with and
without RePo in `--repo-reps` blocks of single steps (RoPE, RePo, RePo, RoPE), each RePo
step's time over its neighbouring RoPE step's. Prints s/step,
tokens/s and MFU from each side's best round (FLOP formula in repo_jax/train/flops.py;
peak obtained exactly as the trainer does, printed), how many timed steps stalled, and
the ratio to PyTorch and RePo's time over RoPE's as the median of the per-round (per-pair)
ratios with their range and a 95% bootstrap interval, RePo / RoPE by wall time, by
process CPU time and by user CPU time (the interval: one ratio strays by +-5-10% on a
shared VM), and next to them the ratio of the means of every timed step, stalls included.

    python -m benchmarks.bench_train                       # every case
    python -m benchmarks.bench_train --case long --reps 9  # one case, more rounds
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Case:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    repo_start: int  # the RePo side has RePo layers from here on
    what: str


CASES = {
    "transformer": Case(512, 8, 8, 1536, 8192, 4, 512, 2,
                        "transformer-shaped; RePo from layer 2 (the 1B recipe's 5 of 16)"),
    "default": Case(256, 4, 4, 768, 100352, 4, 256, 1,
                    "the old default: the 100k vocabulary projection dominates"),
    "long": Case(256, 4, 4, 768, 4096, 2, 2048, 1, "2048 tokens: attention dominates"),
    "repo-heavy": Case(512, 8, 8, 1536, 8192, 4, 512, 1,
                       "transformer-shaped, RePo on every layer but the first"),
}


def model_config(c: Case, repo: bool = False):
    from repo_jax.config import ModelConfig

    # Special token ids inside the vocabulary: transformers refuses a padding index outside it.
    special = min(100257, c.vocab - 2)
    cfg = ModelConfig(vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.intermediate,
                      num_hidden_layers=c.layers, num_attention_heads=c.heads,
                      num_key_value_heads=c.heads, max_position_embeddings=max(c.seq, 64),
                      original_max_position_embeddings=max(c.seq, 64),
                      eos_token_id=special, pad_token_id=special + 1)
    return cfg.replace(repo_start_layer=c.repo_start) if repo else cfg


def jax_train_step(cfg, tokens, ocfg, z_loss: float):
    """(jitted train step, [state] in a list to be replaced, batch) on one device, the
    state built as the trainer builds it: an unplaced step counter or moments would make
    the second call compile again (the old version of this script timed that compile)."""
    import jax
    import jax.numpy as jnp

    from repo_jax import sharding as shd
    from repo_jax.config import MeshConfig, ScheduleConfig, TrainConfig
    from repo_jax.train import TrainState, init_params, model_spec
    from repo_jax.train.optimizer import make_optimizer, schedule
    from repo_jax.train.step import make_train_step, opt_state_shardings

    mesh = shd.make_mesh(MeshConfig(), jax.devices()[:1])
    spec = model_spec(cfg)
    p_shard = shd.param_shardings(spec.abstract, spec.logical_axes, mesh)
    sched = schedule(ScheduleConfig(kind="constant"), ocfg.lr, 1)
    tx = make_optimizer(ocfg, sched, spec.abstract.keys())
    shardings = TrainState(shd.replicated(mesh), p_shard, opt_state_shardings(tx, spec.abstract, p_shard, mesh))
    params = init_params(spec, 0, p_shard)
    state = TrainState(jax.device_put(jnp.int32(0), shd.replicated(mesh)), params,
                       jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
    # The trainer's default vocabulary tiling: the step a user of train.py runs.
    step = make_train_step(spec, tx, sched, z_loss, mesh, shardings, TrainConfig().loss_chunk)
    return step, [state], jax.device_put(tokens[None], shd.batch_sharding(mesh))


def upstream_step(cfg, params: dict, tokens, ocfg, z_loss: float):
    """(one `transformers` + `torch.optim.AdamW` step -> its cross-entropy) on our weights."""
    import numpy as np
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from repo_jax.hf_format import config_to_hf, path_to_hf

    model = Olmo2ForCausalLM(Olmo2Config(**config_to_hf(cfg))).float().train()
    sd = {}
    for key, value in params.items():
        hf_name, transpose = path_to_hf(tuple(int(p) if p.isdigit() else p for p in key.split(".")))
        sd[hf_name] = torch.from_numpy(np.array(value.T if transpose else value))
    model.load_state_dict(sd, strict=True)
    decay = [p for n, p in model.named_parameters() if "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if "embed_tokens" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ocfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)
    ids = torch.from_numpy(tokens).long()

    def run_one() -> float:
        logits = model(ids).logits[:, :-1].float()
        lse = torch.logsumexp(logits, -1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss = ce + z_loss * (lse ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.clip_norm)
        opt.step()
        return ce.item()

    return run_one


def _torch_worker(conn, *args) -> None:
    """The PyTorch side in its own process, as its users run it: one framework's
    allocator and thread pool never run in the other's address space (in one process,
    the JAX step that followed a torch step took up to 2 s longer, in system time)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"  PyTorch's process: LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, "
          f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    run_one = upstream_step(*args)
    while conn.recv():
        t, c0 = time.perf_counter(), _cpu_times()
        ce = run_one()
        c1 = _cpu_times()
        conn.send((time.perf_counter() - t, c1[0] - c0[0], c1[1] - c0[1], ce))


@contextlib.contextmanager
def _glibc_env():
    """This process's environment without host_memory's allocator settings, for a child
    started inside: PyTorch as its users run it, on glibc's defaults. With our huge-page
    tunable its transformer-case step took 5.94 s against 4.54 s (median of the best of two
    steps in 4 rounds, processes alternating; 2.6-3.8 s of system time per step against
    0.6 s on this VM), and on jemalloc 1.1-1.3x its time on glibc."""
    from repo_jax.host_memory import JEMALLOC_CONF, TUNABLE, jemalloc_library

    saved = {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}
    if saved["MALLOC_CONF"] == JEMALLOC_CONF:
        kept = [p for p in (saved["LD_PRELOAD"] or "").split(":") if p and p != jemalloc_library()]
        os.environ.pop("MALLOC_CONF")
        os.environ.pop("LD_PRELOAD", None)
        if kept:
            os.environ["LD_PRELOAD"] = ":".join(kept)
    tunables = [t for t in (saved["GLIBC_TUNABLES"] or "").split(":") if t and not t.startswith(TUNABLE + "=")]
    os.environ.pop("GLIBC_TUNABLES", None)
    if tunables:
        os.environ["GLIBC_TUNABLES"] = ":".join(tunables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(name: str, c: Case, reps: int, burst: int, repo_reps: int, peak: float) -> dict:
    import multiprocessing

    import numpy as np

    from repo_jax.config import ModelConfig, OptimizerConfig
    from repo_jax.train.flops import flops_per_token

    base, repo = model_config(c), model_config(c, repo=True)
    ocfg = OptimizerConfig(lr=1e-3)
    z_loss = 1e-5
    tokens = np.random.default_rng(0).integers(0, c.vocab, (c.batch, c.seq)).astype(np.int32)
    n_tok = c.batch * c.seq

    def ours(cfg: ModelConfig):
        step, state, batch = jax_train_step(cfg, tokens, ocfg, z_loss)
        host_params = {k: np.asarray(v) for k, v in state[0].params.items()}
        losses = []

        def run_one() -> tuple[float, float, float]:
            t, c0 = time.perf_counter(), _cpu_times()
            state[0], m = step(state[0], batch)
            losses.append(float(m["loss"]))  # waits for the step
            wall, c1 = time.perf_counter() - t, _cpu_times()
            assert step._cache_size() == 1, "the train step compiled again"
            return wall, c1[0] - c0[0], c1[1] - c0[1]

        return run_one, losses, host_params

    def upstream(cfg: ModelConfig, params: dict):
        conn, child_end = multiprocessing.Pipe()
        proc = multiprocessing.get_context("spawn").Process(
            target=_torch_worker, args=(child_end, cfg, params, tokens, ocfg, z_loss), daemon=True)
        with _glibc_env():
            proc.start()
        losses = []

        def run_one() -> tuple[float, float, float]:
            conn.send(True)
            wall, cpu, user, ce = conn.recv()
            losses.append(ce)
            return wall, cpu, user

        def stop() -> None:
            conn.send(False)
            proc.join()

        return run_one, losses, stop

    jax_rope, loss_rope, params = ours(base)
    torch_rope, loss_torch, stop_torch = upstream(base, params)
    del params
    jax_repo, _, _ = ours(repo)
    sides = {"repo-jax": jax_rope, "transformers + torch AdamW": torch_rope, "repo-jax, RePo layers": jax_repo}
    for fn in sides.values():
        fn()  # warm-up: compile
    # Every round times each side in turn, in alternating order (a side never always
    # follows the same one). Ratios are taken within a round and their median reported: on
    # a shared 2-core VM the speed drifts by 10% over seconds, which best-of-N across rounds
    # turned into RePo/RoPE ratios anywhere from 0.98 to 1.17 for the same code.
    # Against PyTorch a side runs `burst` steps in a row and the first is not timed: the
    # first step after the other side pays for that side's use of the host (caches; the
    # kernel compacting memory the other process fragmented before it can hand out 2 MiB
    # pages, up to 2 s of system time), which a training job, one framework per host, never
    # pays. A round counts each side's best timed step: on this VM a step that does the
    # same work can take 1.5-13 s of system time instead of 0.15-0.4 s (the host backing the
    # guest's pages again, repo_jax/host_memory.py), one step in two or three, either side.
    walls = {k: [] for k in sides}
    cpus = {k: [] for k in sides}
    stalls = {k: 0 for k in sides}  # timed steps with over 1 s of system time
    every = {k: [] for k in sides}  # every timed step's wall time, stalls included

    def rounds(names: list[str], n: int, steps: int) -> None:
        for r in range(n):
            for k in (names if r % 2 == 0 else names[::-1]):
                timed = [sides[k]() for _ in range(steps)][1:]
                walls[k].append(min(t[0] for t in timed))
                cpus[k].append(min(t[1] for t in timed))
                stalls[k] += sum(t[1] - t[2] > 1.0 for t in timed)
                every[k] += [t[0] for t in timed]

    rounds(["repo-jax", "transformers + torch AdamW"], reps, burst)
    stop_torch()
    # RePo against RoPE, PyTorch's process stopped (with it, one of the two always ran right
    # after PyTorch's step, and on the vocabulary-bound case the per-round ratio spread over
    # 0.60-1.94: the memory PyTorch churned through). Single steps in ABBA blocks (RoPE,
    # RePo, RePo, RoPE), every step timed, each RePo step paired with the RoPE step next to
    # it: the host's speed drifts over seconds, and two neighbouring steps share most of
    # it. On the transformer case, 30 blocks, the median of those pair ratios had a 95%
    # interval 2.8% wide, against 3.7-5.1% for the per-block ratio of sums or of bests and
    # for the ratio of the medians or means of all steps (one run, resampled by blocks);
    # 10 rounds of best-of-two bursts, the old method, gave intervals 8-17% wide. The
    # first step after a switch counts too: with jemalloc keeping the step's buffer
    # (repo_jax/host_memory.py) it pays no more system time than the next one (median
    # 0.03 s either way).
    first, first_every = len(walls["repo-jax"]), len(every["repo-jax"])  # where the RePo phase starts
    for k in ("repo-jax", "repo-jax, RePo layers"):
        sides[k]()  # not timed: the first step after PyTorch's pays for the memory it churned
    pairs = []  # per block: [[wall, cpu, user] RePo / RoPE for each of its two pairs]
    for _ in range(repo_reps):
        block = [(k, sides[k]()) for k in ("repo-jax", "repo-jax, RePo layers", "repo-jax, RePo layers", "repo-jax")]
        for k, t in block:
            walls[k].append(t[0])
            cpus[k].append(t[1])
            stalls[k] += t[1] - t[2] > 1.0
            every[k].append(t[0])
        pairs.append([[repo_t / rope_t for repo_t, rope_t in zip(block[j][1], block[i][1])]
                      for i, j in ((0, 1), (3, 2))])
    best = {k: min(v) for k, v in walls.items()}
    cpu = {k: min(v) for k, v in cpus.items()}

    repo_layers = ",".join(map(str, repo.repo_layers))
    print(f"\n[{name}] {c.what}\n  batch {c.batch} x {c.seq} tokens, d={c.hidden}, {c.layers} layers, "
          f"{c.heads} heads, I={c.intermediate}, vocab {c.vocab}; RePo layers {repo_layers}")
    print(f"  first-step loss on the same weights: repo-jax {loss_rope[0]:.6f}, transformers {loss_torch[0]:.6f}")
    print(f"  {'':28s} {'s/step':>8s} {'CPU s/step':>10s} {'tokens/s':>9s} {'MFU':>6s} {'steps with >1 s system time':>28s}")
    for k, cfg in (("repo-jax", base), ("transformers + torch AdamW", base), ("repo-jax, RePo layers", repo)):
        mfu = flops_per_token(cfg, c.seq) * n_tok / best[k] / peak
        print(f"  {k:28s} {best[k]:8.3f} {cpu[k]:10.3f} {n_tok / best[k]:9.1f} {mfu:6.1%} "
              f"{stalls[k]:>20d} of {len(every[k])}")
    ratio, ratio_range, ratio_ci = _median_ci(np.asarray(walls["transformers + torch AdamW"])
                                              / np.asarray(walls["repo-jax"][:first]))
    # What a run of steps on this host averages, stalls included (the median above is the
    # step's own speed): the stalls come with XLA:CPU's fresh per-step buffer, so they
    # are part of what a user of this VM sees.
    mean_ratio = np.mean(every["transformers + torch AdamW"]) / np.mean(every["repo-jax"][:first_every])
    repo_mean = np.mean(every["repo-jax, RePo layers"]) / np.mean(every["repo-jax"][first_every:])
    pairs = np.asarray(pairs)  # [block, pair, wall/cpu/user]
    repo_ratio, repo_range, repo_ci = _median_ci(pairs[..., 0])
    repo_cpu, _, repo_cpu_ci = _median_ci(pairs[..., 1])
    repo_user, _, repo_user_ci = _median_ci(pairs[..., 2])
    flop_ratio = flops_per_token(repo, c.seq) / flops_per_token(base, c.seq)
    # Process CPU time is what the step itself consumed: on a loaded host wall time also
    # counts the time the scheduler gave to other processes (torch's OpenMP workers also
    # spin while they wait, so its CPU time is inflated; compare it by wall time).
    # The most any implementation could reach: the step's model FLOPs at the measured peak,
    # attention counted causally (half of the formula's [T, T] term, what SDPA computes).
    causal = flops_per_token(base, c.seq) - 6 * c.layers * c.hidden * c.seq
    ceiling = best["transformers + torch AdamW"] / (causal * n_tok / peak)
    print(f"  repo-jax / transformers speed: {ratio:.2f}x (95% CI {ratio_ci[0]:.2f}-{ratio_ci[1]:.2f}, "
          f"rounds {ratio_range[0]:.2f}-{ratio_range[1]:.2f}; a step at 100% of the peak would be {ceiling:.2f}x); "
          f"mean of every timed step, stalls included: {mean_ratio:.2f}x")
    # User CPU time is the step's own computation. The rest of process CPU time is the
    # kernel's, mostly mapping and zeroing the step's fresh temporary buffer (the stalls).
    print(f"  RePo / RoPE step time: {repo_ratio:.3f} wall (95% CI {repo_ci[0]:.3f}-{repo_ci[1]:.3f}, pairs "
          f"{repo_range[0]:.3f}-{repo_range[1]:.3f}), {repo_cpu:.3f} CPU (95% CI {repo_cpu_ci[0]:.3f}-"
          f"{repo_cpu_ci[1]:.3f}), {repo_user:.3f} user CPU (95% CI {repo_user_ci[0]:.3f}-{repo_user_ci[1]:.3f}); "
          f"FLOP ratio {flop_ratio:.4f}; mean of every step {repo_mean:.3f}")
    return {"ratio": ratio, "mean_ratio": mean_ratio, "repo_mean": repo_mean, "ratio_ci": ratio_ci,
            "repo_ratio": repo_ratio, "repo_ci": repo_ci,
            "repo_cpu": repo_cpu, "repo_cpu_ci": repo_cpu_ci, "repo_user": repo_user,
            "repo_user_ci": repo_user_ci, "flop_ratio": flop_ratio, "ceiling": ceiling}


def _cpu_times() -> tuple[float, float]:
    """(user + system, user) CPU seconds this process has used, all threads."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_utime


def _median_ci(ratios) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """Median of `ratios` ([round] or [block, pair]), their range, and a 95% bootstrap
    interval of that median (rounds or blocks resampled with replacement, fixed seed:
    a block's pairs share its stretch of host speed, so they are drawn together). On
    this kind of host one ratio strays by +-5-10% (the host's speed changes within a
    step, in CPU time as much as in wall time): the interval says how far a figure can be
    read."""
    import numpy as np

    ratios = np.asarray(ratios, dtype=float)
    draws = np.random.default_rng(0).integers(0, len(ratios), size=(4000, len(ratios)))
    lo, hi = np.percentile(np.median(ratios[draws].reshape(4000, -1), axis=1), [2.5, 97.5])
    return float(np.median(ratios)), (float(ratios.min()), float(ratios.max())), (float(lo), float(hi))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="case to run (repeatable; default: all)")
    ap.add_argument("--reps", type=int, default=5, help="rounds against PyTorch (each runs every side in turn)")
    ap.add_argument("--burst", type=int, default=3,
                    help="steps a side runs in a row per round against PyTorch; the best after the first counts")
    # 60: with 30 the repo-heavy case's 95% interval was ~3% wide, and its runs read
    # 1.025-1.037 where 60-80 blocks gave 1.013 [1.010-1.017] (README, Training).
    ap.add_argument("--repo-reps", type=int, default=60,
                    help="blocks of RePo against RoPE after the PyTorch rounds (RoPE, RePo, RePo, RoPE; one step each)")
    args = ap.parse_args()
    if args.burst < 2 or min(args.reps, args.repo_reps) < 1:
        ap.error("--burst needs at least 2 steps (the first is not timed), "
                 "--reps and --repo-reps at least 1")

    import jax

    from repo_jax.train.flops import peak_flops

    peak, how = peak_flops(0.0, 1)  # what train.py divides by on this host
    print(f"float32 on {os.cpu_count()} CPU cores ({jax.default_backend()}); "
          f"peak {peak / 1e9:.1f} GFLOP/s ({how}); {args.reps} interleaved rounds against PyTorch, "
          f"{args.burst} steps per side per round, the best after the first counted; "
          f"{args.repo_reps} blocks of RePo against RoPE (RoPE, RePo, RePo, RoPE; every step timed); "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, "
          f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '')!r}")
    results = {name: run_case(name, CASES[name], args.reps, args.burst, args.repo_reps,
                                   peak) for name in args.case or CASES}
    print(f"\nmedian of per-round (RePo/RoPE: per-pair) ratios [95% bootstrap interval]\n{'case':12s} {'repo-jax/transformers':>22s} "
          f"{'at 100% of peak':>16s} {'RePo/RoPE wall':>22s} {'RePo/RoPE CPU':>22s} {'RePo/RoPE user':>22s} "
          f"{'FLOP ratio':>10s} {'means: vs torch':>15s} {'RePo/RoPE':>9s}")
    for name, r in results.items():
        (lo, hi), (rlo, rhi), (clo, chi), (ulo, uhi) = r["ratio_ci"], r["repo_ci"], r["repo_cpu_ci"], r["repo_user_ci"]
        print(f"{name:12s} {r['ratio']:5.2f}x [{lo:.2f}-{hi:.2f}]{'':3s} {r['ceiling']:15.2f}x "
              f"{r['repo_ratio']:7.3f} [{rlo:.3f}-{rhi:.3f}] {r['repo_cpu']:7.3f} [{clo:.3f}-{chi:.3f}] "
              f"{r['repo_user']:7.3f} [{ulo:.3f}-{uhi:.3f}] {r['flop_ratio']:10.4f} "
              f"{r['mean_ratio']:14.2f}x {r['repo_mean']:9.3f}")

if __name__ == "__main__":
    from repo_jax.host_memory import reexec_with_host_allocator

    reexec_with_host_allocator()  # as train.py does; the torch process inherits the setting
    main()
