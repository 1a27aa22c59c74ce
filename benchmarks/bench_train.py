"""Training-step throughput: repo-jax vs upstream PyTorch, side by side, one run.

Measures, on the same token batch and the same starting weights, float32:
  * our jitted step (forward, backward, CE + z-loss, clipping, AdamW) on one device,
  * upstream `transformers.Olmo2ForCausalLM` + `torch.optim.AdamW` doing the same,
  * our step with RePo layers (the model we actually train; upstream has no RePo),
and prints tokens/s, MFU (FLOP formula in repo_jax/train/flops.py; peak = the
host's measured float32 matmul rate) and the ratio.

    python benchmarks/bench_train.py [--hidden 256 --layers 4 --seq 256 --batch 4 --steps 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=100352)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from repo_jax import sharding as shd
    from repo_jax.config import MeshConfig, ModelConfig, OptimizerConfig, ScheduleConfig
    from repo_jax.hf_format import config_to_hf
    from repo_jax.train import TrainState, init_params, model_spec
    from repo_jax.train.flops import flops_per_token, measure_cpu_peak
    from repo_jax.train.optimizer import make_optimizer, schedule
    from repo_jax.train.step import make_train_step, opt_state_shardings

    base = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 64),
                       original_max_position_embeddings=max(args.seq, 64))
    repo = base.replace(repo_start_layer=min(1, args.layers - 1))
    ocfg = OptimizerConfig(lr=1e-3)
    z_loss = 1e-5
    tokens = np.random.default_rng(0).integers(0, min(args.vocab, 100278), (args.batch, args.seq)).astype(np.int32)
    n_tok = args.batch * args.seq
    peak = measure_cpu_peak()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"batch {args.batch} x {args.seq} tokens, d={args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"float32 on {os.cpu_count()} CPU cores; measured peak {peak / 1e9:.1f} GFLOP/s")

    def time_steps(fn) -> float:
        fn()  # warm-up (compile)
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - t) / args.steps

    def ours(cfg: ModelConfig):
        mesh = shd.make_mesh(MeshConfig(), jax.devices()[:1])
        spec = model_spec(cfg)
        p_shard = shd.param_shardings(spec.abstract, spec.logical_axes, mesh)
        sched = schedule(ScheduleConfig(kind="constant"), ocfg.lr, 1)
        tx = make_optimizer(ocfg, sched, spec.abstract.keys())
        shardings = TrainState(shd.replicated(mesh), p_shard, opt_state_shardings(tx, spec.abstract, p_shard, mesh))
        params = init_params(spec, 0, p_shard)
        state = [TrainState(jnp.int32(0), params, jax.jit(tx.init)(params))]
        host_params = {k: np.asarray(v) for k, v in params.items()}
        step = make_train_step(spec, tx, sched, z_loss, mesh, shardings)
        batch = jax.device_put(tokens[None], shd.batch_sharding(mesh))
        first = []

        def run_one():
            state[0], m = step(state[0], batch)
            first.append(float(m["loss"]))

        return time_steps(run_one), first[0], host_params

    def upstream(cfg: ModelConfig, params: dict):
        from transformers import Olmo2Config, Olmo2ForCausalLM

        from repo_jax.hf_format import path_to_hf

        model = Olmo2ForCausalLM(Olmo2Config(**config_to_hf(cfg))).float().train()
        sd = {}
        for key, value in params.items():
            name, transpose = path_to_hf(tuple(int(p) if p.isdigit() else p for p in key.split(".")))
            sd[name] = torch.from_numpy(np.array(value.T if transpose else value))
        model.load_state_dict(sd, strict=True)
        decay = [p for n, p in model.named_parameters() if "embed_tokens" not in n]
        no_decay = [p for n, p in model.named_parameters() if "embed_tokens" in n]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": ocfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)
        ids = torch.from_numpy(tokens).long()
        first = []

        def run_one():
            logits = model(ids).logits[:, :-1].float()
            lse = torch.logsumexp(logits, -1)
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss = ce + z_loss * (lse ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.clip_norm)
            opt.step()
            first.append(ce.item())

        return time_steps(run_one), first[0]

    t_ours, loss_ours, params = ours(base)
    t_torch, loss_torch = upstream(base, params)
    t_repo, _, _ = ours(repo)

    rows = [("repo-jax (jax.jit step)", base, t_ours), ("transformers + torch AdamW", base, t_torch),
            ("repo-jax, RePo layers", repo, t_repo)]
    print(f"first-step loss on the same weights: repo-jax {loss_ours:.6f}, transformers {loss_torch:.6f}")
    print(f"{'':30s} {'s/step':>8s} {'tokens/s':>10s} {'MFU':>7s}")
    for name, cfg, t in rows:
        mfu = flops_per_token(cfg, args.seq) * n_tok / t / peak
        print(f"{name:30s} {t:8.3f} {n_tok / t:10.1f} {mfu:7.1%}")
    print(f"ratio repo-jax / transformers tokens/s: {t_torch / t_ours:.2f}x")


if __name__ == "__main__":
    main()
