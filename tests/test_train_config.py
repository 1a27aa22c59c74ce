"""Config loading and overrides, the presets, optimizer and loss against PyTorch, FLOPs."""
from __future__ import annotations

from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from absl.testing import parameterized

from repo_jax.config import ConfigError, ModelConfig, ScheduleConfig, TrainConfig
from repo_jax.loading import param_count
from repo_jax.train import flops
from repo_jax.train.loss import lm_loss
from repo_jax.train.optimizer import decay_mask, make_optimizer, param_group, schedule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_are_typed_and_unknown_keys_named(tmp_path):
    cfg = TrainConfig.load(None, ["steps=7", "optimizer.lr=1e-4", "mesh.fsdp=-1", "mesh.data=1",
                                  "data.paths=a.npy", "model.preset=tiny", "model.dtype=bfloat16",
                                  "model.repo_start_layer=2", "checkpoint.async_save=false"])
    assert (cfg.steps, cfg.optimizer.lr, cfg.mesh.fsdp, cfg.data.paths) == (7, 1e-4, -1, ("a.npy",))
    assert cfg.model.dtype == "bfloat16" and cfg.model.repo_layers == (2, 3)
    assert cfg.checkpoint.async_save is False
    for bad, msg in [("stepz=1", r"\['stepz'\]"), ("optimizer.beta=1", r"optimizer.beta"),
                     ("model.hiden_size=3", r"model.hiden_size"), ("steps=ten", "steps='ten'"),
                     ("log_every=0", "log_every=0"), ("mesh.data=x", "mesh.data"),
                     ("grad_accum=3", "grad_accum=3 does not divide")]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig.load(None, [bad])
    (tmp_path / "c.yaml").write_text("optimizer: {lr: 1}\nbogus: 2\n")
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.load(str(tmp_path / "c.yaml"))


def test_presets_load_and_the_1b_recipe_is_the_papers():
    for f in CONFIGS.glob("*.yaml"):
        TrainConfig.load(str(f))
    cfg = TrainConfig.load(str(CONFIGS / "olmo2-1b-repo.yaml"))
    o = cfg.optimizer
    assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (7.4487e-5, 0.9, 0.95, 1e-8, 0.1, 1.0)
    assert o.decay_norms and not o.decay_embeddings
    assert (cfg.schedule.kind, cfg.schedule.warmup_steps, cfg.schedule.final_fraction) == ("linear", 0, 0.0)
    assert (cfg.z_loss, cfg.batch_size, cfg.data.seq_len, cfg.steps) == (1e-5, 512, 4096, 23852)
    assert cfg.model.repo_start_layer == 5 and cfg.model.dtype == "bfloat16"
    assert cfg.model.param_dtype == "float32" and cfg.data.token_dtype == "uint32"
    assert TrainConfig.load(str(CONFIGS / "olmo2-7b-repo.yaml")).model.hidden_size == 4096


def test_parameter_groups():
    assert param_group("embed_tokens.embedding") == "embedding"
    assert param_group("layers.3.self_attn.q_norm.weight") == "norm"
    assert param_group("layers.3.post_feedforward_layernorm.weight") == "norm"
    assert param_group("norm.weight") == "norm"
    assert param_group("layers.3.self_attn.gate_map.kernel") == "matrix"
    assert param_group("lm_head.kernel") == "matrix"


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules(kind):
    s = schedule(ScheduleConfig(kind=kind, warmup_steps=10, final_fraction=0.1), 1.0, 110)
    lr = np.asarray([s(i) for i in range(120)])
    np.testing.assert_allclose(lr[:10], (np.arange(10) + 1) / 10, rtol=1e-6)
    end = {"linear": 0.1, "cosine": 0.1, "constant": 1.0}[kind]
    assert lr[10] == pytest.approx(1.0) and lr[110] == pytest.approx(end) and lr[119] == pytest.approx(end)
    mid = {"linear": 0.55, "cosine": 0.55, "constant": 1.0}[kind]
    assert lr[60] == pytest.approx(mid, rel=1e-5)
    # The paper's schedule: linear to 0, no warmup: the first update uses the peak.
    paper = schedule(ScheduleConfig(), 7.4487e-5, 23852)
    assert float(paper(0)) == pytest.approx(7.4487e-5) and float(paper(23852)) == 0.0


def test_adamw_groups_clipping_and_schedule_match_torch():
    """Three updates of our optimizer vs torch.optim.AdamW with two parameter groups
    (embeddings without decay), clip_grad_norm_ and a LambdaLR linear decay."""
    from repo_jax.config import OptimizerConfig

    rng = np.random.default_rng(0)
    shapes = {"embed_tokens.embedding": (7, 4), "layers.0.mlp.up_proj.kernel": (4, 6),
              "layers.0.self_attn.q_norm.weight": (6,), "lm_head.kernel": (4, 7)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (rng.normal(size=s) * 3).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    ocfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, decay_norms=True, decay_embeddings=False,
                           clip_norm=1.0)
    sched = schedule(ScheduleConfig(kind="linear"), ocfg.lr, 3)
    tx = make_optimizer(ocfg, sched, params.keys())
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    mask = decay_mask(params.keys(), ocfg)
    opt = torch.optim.AdamW(
        [{"params": [tp[k] for k in tp if mask[k]], "weight_decay": 0.1},
         {"params": [tp[k] for k in tp if not mask[k]], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 3)
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()
        lam.step()
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), atol=1e-6, err_msg=k)


class LossTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_matches_torch_cross_entropy_and_z_loss(self):
        rng = np.random.default_rng(1)
        logits = (rng.normal(size=(2, 5, 11)) * 4).astype(np.float32)
        tokens = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
        ce, z = self.variant(lm_loss)(jnp.asarray(logits), jnp.asarray(tokens))
        tl = torch.tensor(logits)[:, :-1].reshape(-1, 11)
        tt = torch.tensor(tokens)[:, 1:].reshape(-1).long()
        assert float(ce) == pytest.approx(torch.nn.functional.cross_entropy(tl, tt).item(), rel=1e-6)
        assert float(z) == pytest.approx((torch.logsumexp(tl, -1) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", ["olmo2-1b", "olmo2-1b-repo", "olmo2-7b-repo", "tiny-repo"])
def test_flop_count_covers_every_matmul_weight(name):
    cfg = ModelConfig.preset(name)
    norms = (4 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    embedding = cfg.vocab_size * cfg.hidden_size
    assert flops.matmul_params(cfg) == param_count(cfg) - embedding - norms
    t = 4096
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * t
    assert flops.flops_per_token(cfg, t) == 6 * flops.matmul_params(cfg) + attn


def test_repo_costs_about_one_percent_at_1b():
    """The paper: RePo adds about 0.9% parameters and FLOPs at 1B."""
    base = flops.flops_per_token(ModelConfig.preset("olmo2-1b"), 4096)
    repo = flops.flops_per_token(ModelConfig.preset("olmo2-1b-repo"), 4096)
    assert 0.005 < repo / base - 1 < 0.012
