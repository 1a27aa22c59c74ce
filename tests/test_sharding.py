"""Mesh construction, the logical-axis rules, and the same losses on every mesh shape."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from repo_jax import sharding as shd
from repo_jax.config import ConfigError, MeshConfig
from repo_jax.train import init_params, model_spec
from repo_jax.train.loop import run
from tests._train_utils import config, final_params, losses, write_tokens


def test_mesh_shape_resolves_rest_and_checks_product():
    assert shd.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert shd.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match="multiply"):
        shd.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="cannot be split"):
        shd.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)


def test_rules_map_logical_axes_and_skip_non_dividing_sizes():
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert shd.logical_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
    assert shd.logical_spec(("embed", "heads"), (64, 64), mesh) == P("fsdp", "tensor")
    assert shd.logical_spec(("norm",), (64,), mesh) == P(None)
    assert shd.logical_spec(("batch", "seq"), (8, 32), mesh) == P(("data", "fsdp"), None)
    # 3 does not split over tensor=2: that dimension stays whole, and it is reported.
    assert shd.logical_spec(("embed", "repo_heads"), (64, 3), mesh) == P("fsdp", None)
    assert shd.logical_spec(("embed", "heads"), (64, 3), mesh) == P("fsdp", None)
    assert shd.unsharded_dims(("embed", "heads"), (64, 3), mesh) == ["heads=3"]


def test_parameters_are_created_in_their_shards(tmp_path):
    cfg = config(tmp_path, tmp_path / "unused")
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    spec = model_spec(cfg.model)
    shardings = shd.param_shardings(spec.abstract, spec.logical_axes, mesh)
    params = init_params(spec, 0, shardings)
    emb = params["embed_tokens.embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    # Each device holds a quarter of the embedding (vocab/2 x embed/2), replicated over data.
    assert {s.data.shape for s in emb.addressable_shards} == {(128, 32)}
    # Same values whatever the mesh (partitionable PRNG).
    one = init_params(spec, 0, shd.param_shardings(spec.abstract, spec.logical_axes,
                                                   shd.make_mesh(MeshConfig(), jax.devices()[:1])))
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(one["embed_tokens.embedding"]))


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_first_losses_match_one_device(tmp_path_factory, mesh, reference_losses):
    tmp = tmp_path_factory.mktemp("mesh")
    data = write_tokens(tmp / "tokens.npy", 12000)
    d, f, t = mesh
    # Execution choices that must not change the numbers ride along on one mesh each.
    extra = {(1, 8, 1): {"scan_layers": True, "model.remat": "full"},
             (1, 1, 8): {"model.remat": "dots"}}.get(mesh, {})
    run(config(tmp, data, steps=3, **{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t,
                                      "checkpoint.every": 0, **extra}))
    got = losses(tmp / "run")
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], reference_losses, rtol=2e-6, atol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Three steps on a single device: (run_dir, losses)."""
    tmp = tmp_path_factory.mktemp("one")
    data = write_tokens(tmp / "tokens.npy", 12000)
    run(config(tmp, data, steps=3, **{"checkpoint.every": 0}), devices=jax.devices()[:1])
    got = losses(tmp / "run")
    return tmp / "run", [got[s] for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def reference_losses(reference):
    return reference[1]


def test_gradient_accumulation_matches_one_batch(tmp_path, reference_losses):
    data = write_tokens(tmp_path / "tokens.npy", 12000)
    run(config(tmp_path, data, steps=3, grad_accum=4, **{"mesh.data": 2, "mesh.tensor": 4,
                                                         "checkpoint.every": 0}))
    got = losses(tmp_path / "run")
    assert got[1] == pytest.approx(reference_losses[0], rel=2e-6)
    # After an Adam step, round-off in near-zero gradient entries is amplified a little.
    np.testing.assert_allclose([got[2], got[3]], reference_losses[1:], rtol=2e-5)


def test_resume_onto_another_mesh_continues_the_run(tmp_path, reference):
    ref_dir, ref_losses = reference
    data = write_tokens(tmp_path / "tokens.npy", 12000)
    same = {"schedule.decay_steps": 3}  # the schedule of the 3-step reference
    run(config(tmp_path, data, steps=2, **same, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    out = run(config(tmp_path, data, steps=3, **same, **{"mesh.data": 1, "mesh.fsdp": 8}))
    assert out["step"] == 3
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[1], got[2]], ref_losses[:2], rtol=2e-6)
    assert got[3] == pytest.approx(ref_losses[2], rel=2e-5)
    want, have = final_params(ref_dir), final_params(tmp_path / "run")
    for k in want:
        # Adam turns round-off in a near-zero gradient entry into a +-lr step, so allow
        # a rare outlier element but nothing systematic.
        off = np.abs(have[k] - want[k]) > 1e-5
        assert off.mean() < 1e-3, (k, int(off.sum()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_match_one_device(tmp_path, reference_losses):
    """Two processes on localhost (4 CPU devices each, gloo collectives) train on one
    2x2x2 mesh; each reads only its own batch rows. Losses match the single device."""
    import os
    import subprocess
    import sys

    from tests._train_utils import cli_args

    data = write_tokens(tmp_path / "tokens.npy", 12000)
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for pid in range(2):
        args = cli_args(tmp_path, data, steps=3, **{
            "checkpoint.every": 0, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
            "distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2, "distributed.process_id": pid})
        procs.append(subprocess.Popen([sys.executable, "train.py", *args], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "2 process(es)" in outs[0]
    got = losses(tmp_path / "run")
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], reference_losses, rtol=2e-6, atol=0)
    # The checkpoint both processes wrote is a complete model directory.
    from repo_jax import load_model

    model = load_model(tmp_path / "run")
    assert model.config.repo_layers == (1, 2)


@pytest.mark.parametrize("preset", ["olmo2-1b-repo", "olmo2-7b-repo"])
def test_pod_presets_trace_sharded_on_eight_devices(preset):
    """The 1B/7B configs' full step (bf16 compute, scan, remat, accumulation) lowers on
    an 8-device mesh, with parameters and Adam moments split, not replicated."""
    import jax.numpy as jnp

    from pathlib import Path

    from repo_jax.config import TrainConfig
    from repo_jax.train import TrainState
    from repo_jax.train.optimizer import make_optimizer, schedule
    from repo_jax.train.step import make_train_step, opt_state_shardings

    cfg = TrainConfig.load(str(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml"),
                           ["batch_size=16", "grad_accum=2"])
    mesh = shd.make_mesh(cfg.mesh)
    spec = model_spec(cfg.model, cfg.scan_layers)
    p_shard = shd.param_shardings(spec.abstract, spec.logical_axes, mesh)
    sched = schedule(cfg.schedule, cfg.optimizer.lr, cfg.steps)
    tx = make_optimizer(cfg.optimizer, sched, spec.abstract.keys())
    shardings = TrainState(shd.replicated(mesh), p_shard, opt_state_shardings(tx, spec.abstract, p_shard, mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            TrainState(jax.ShapeDtypeStruct((), jnp.int32), spec.abstract,
                                       jax.eval_shape(tx.init, spec.abstract)), shardings)
    total = sum(np.prod(a.shape) for a in jax.tree.leaves(abstract))
    per_device = sum(np.prod(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(abstract))
    assert per_device < total / 7  # about 1/8: norms and RePo's small maps stay replicated
    step = make_train_step(spec, tx, sched, cfg.z_loss, mesh, shardings)
    batch = jax.ShapeDtypeStruct((2, 8, cfg.data.seq_len), jnp.int32, sharding=shd.batch_sharding(mesh))
    # Lowered for TPU (no libtpu needed to lower): the presets use the splash kernel.
    hlo = step.trace(abstract, batch).lower(lowering_platforms=("tpu",)).as_text()
    assert "bf16" in hlo
    assert "tpu_custom_call" in hlo  # splash attention, sharded by shard_map
