"""Everything a training run compiles, built once from the config and a mesh.

`run` (repo_jax/train/loop.py) trains with it; `repo_jax.train.aot` compiles the
very same steps for a TPU topology without a TPU. Nothing here touches data
files, checkpoints or device memory: the state and batches are abstract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from repo_jax import sharding as shd
from repo_jax.config import ConfigError, TrainConfig
from repo_jax.train.optimizer import make_optimizer, schedule
from repo_jax.train.state import ModelSpec, TrainState, model_spec
from repo_jax.train.step import make_eval_step, make_train_step, opt_state_shardings


@dataclass(frozen=True)
class Built:
    mesh: Mesh
    spec: ModelSpec
    sched: optax.Schedule
    tx: optax.GradientTransformation
    state_shardings: TrainState
    train_step: Callable            # jitted (state, batch [accum, micro, T]) -> (state, metrics)
    eval_step: Callable             # jitted (params, batch [1, micro, T]) -> mean CE

    def abstract_state(self) -> TrainState:
        """The train state as sharded ShapeDtypeStructs (restore target, AOT input)."""
        abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), self.spec.abstract,
                              jax.eval_shape(self.tx.init, self.spec.abstract))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, self.state_shardings)


def check_batch(cfg: TrainConfig, mesh: Mesh) -> None:
    parallel = shd.batch_parallelism(mesh)
    if cfg.micro_batch_size % parallel:
        raise ConfigError(f"batch_size / grad_accum = {cfg.micro_batch_size} sequences do not divide "
                          f"across the mesh's data*fsdp = {parallel} devices; make it a multiple "
                          f"of {parallel}")


def build(cfg: TrainConfig, mesh: Mesh) -> Built:
    check_batch(cfg, mesh)
    spec = model_spec(cfg.model, cfg.scan_layers)
    p_shard = shd.param_shardings(spec.abstract, spec.logical_axes, mesh)
    sched = schedule(cfg.schedule, cfg.optimizer.lr, cfg.steps)
    tx = make_optimizer(cfg.optimizer, sched, spec.abstract.keys())
    o_shard = opt_state_shardings(tx, spec.abstract, p_shard, mesh)
    state_shard = TrainState(shd.replicated(mesh), p_shard, o_shard)
    train_step = make_train_step(spec, tx, sched, cfg.z_loss, mesh, state_shard, cfg.loss_chunk)
    eval_step = make_eval_step(spec, mesh, p_shard, cfg.loss_chunk)
    return Built(mesh, spec, sched, tx, state_shard, train_step, eval_step)


def batch_shapes(cfg: TrainConfig, mesh: Mesh) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract (train, eval) token batches as the loader delivers them."""
    sharding = shd.batch_sharding(mesh)
    train = jax.ShapeDtypeStruct((cfg.grad_accum, cfg.micro_batch_size, cfg.data.seq_len), jnp.int32,
                                 sharding=sharding)
    evaluation = jax.ShapeDtypeStruct((1, cfg.micro_batch_size, cfg.data.seq_len), jnp.int32,
                                      sharding=sharding)
    return train, evaluation
