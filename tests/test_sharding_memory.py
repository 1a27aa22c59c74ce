"""Sharding claims checked in XLA's compiled memory, not by reading code: on 8 fake
CPU devices, the real train step splits parameters and optimizer state 8 ways
under fsdp, and splits the activations' batch (temporaries) under fsdp and under
tensor x fsdp as it does under pure data parallelism."""
from __future__ import annotations

import dataclasses

import jax
import pytest

from repo_jax import sharding as shd
from repo_jax.config import MeshConfig, ModelConfig, TrainConfig
from repo_jax.train.build import batch_shapes, build

# 8 heads so that tensor=2 splits them; a RePo layer so its positions are pinned too.
MODEL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                    original_max_position_embeddings=64).replace(repo_start_layer=1)
BATCH, SEQ = 16, 64   # the same global batch on every mesh


def compiled_memory(mesh_cfg: MeshConfig, devices):
    """The trainer's own train step (train/build.py), compiled for `mesh_cfg`."""
    base = TrainConfig()
    cfg = dataclasses.replace(base, model=MODEL, batch_size=BATCH, grad_accum=1, mesh=mesh_cfg,
                              data=dataclasses.replace(base.data, seq_len=SEQ, eos_token_id=0))
    mesh = shd.make_mesh(cfg.mesh, devices)
    built = build(cfg, mesh)
    return built.train_step.lower(built.abstract_state(), batch_shapes(cfg, mesh)[0]).compile() \
        .memory_analysis()


@pytest.fixture(scope="module")
def memory():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, tests/conftest.py)")
    meshes = {"one": (MeshConfig(data=1), 1), "fsdp8": (MeshConfig(data=1, fsdp=8), 8),
              "tensor2_fsdp4": (MeshConfig(data=1, fsdp=4, tensor=2), 8),
              "data8": (MeshConfig(data=8), 8)}
    return {k: compiled_memory(m, jax.devices()[:n]) for k, (m, n) in meshes.items()}


def test_fsdp_splits_parameters_and_optimizer_state_eight_ways(memory):
    one, fsdp = memory["one"].argument_size_in_bytes, memory["fsdp8"].argument_size_in_bytes
    # Norm weights and RePo's small maps stay whole: a little over 1/8.
    assert one / 8 <= fsdp < one / 7, (one, fsdp)


@pytest.mark.parametrize("mesh", ["fsdp8", "tensor2_fsdp4"])
def test_activations_are_split_along_the_batch(memory, mesh):
    one, data8 = memory["one"].temp_size_in_bytes, memory["data8"].temp_size_in_bytes
    got = memory[mesh].temp_size_in_bytes
    # 8 ways of batch (or 4 of batch x 2 of heads): near 1/8 of one device's temporaries,
    # as pure data parallelism gets. Without activation pins XLA kept most of the batch
    # on every chip under fsdp (36% of one device here).
    assert got < one / 5, (mesh, got, one)
    assert got < 1.5 * data8, (mesh, got, data8)
