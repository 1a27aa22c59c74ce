"""Train state and the split NNX model: one graphdef, parameters as a flat dict.

Parameters live in a flat dict keyed by dotted NNX paths (the same keys as the
repo-jax model directory, `params_io.flat_params`), so checkpoints, optimizer
masks and shardings all index them the same way. The model is split once;
`ModelSpec.merge` rebuilds it inside the jitted step from (graphdef, params).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
from flax import nnx
from jax.sharding import NamedSharding

from repo_jax import params_io
from repo_jax.config import ModelConfig
from repo_jax.model import Olmo2Model


class TrainState(NamedTuple):
    step: jax.Array                 # int32 scalar: optimizer updates done
    params: dict[str, jax.Array]    # float32 master parameters
    opt_state: Any


@dataclass(frozen=True)
class ModelSpec:
    cfg: ModelConfig
    scan_layers: bool
    graphdef: Any
    variables: tuple                # ((path, key, abstract Variable), ...)

    @property
    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: v.get_value() for _, k, v in self.variables}

    @property
    def logical_axes(self) -> dict[str, tuple[str, ...]]:
        return {k: v.get_metadata()["logical_axes"] for _, k, v in self.variables}

    def merge(self, params: dict[str, jax.Array]) -> Olmo2Model:
        state = nnx.from_flat_state([(p, v.replace(params[k])) for p, k, v in self.variables])
        return nnx.merge(self.graphdef, state)


def model_spec(cfg: ModelConfig, scan_layers: bool = False) -> ModelSpec:
    abstract = nnx.eval_shape(lambda: Olmo2Model(cfg, rngs=nnx.Rngs(0), scan_layers=scan_layers))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    # Everything trainable is a Param; anything else would be silently dropped below.
    assert not jax.tree.leaves(rest), f"model has non-Param state: {rest}"
    variables = tuple((p, params_io.path_key(p), v) for p, v in nnx.to_flat_state(params))
    return ModelSpec(cfg, scan_layers, graphdef, variables)


def init_params(spec: ModelSpec, seed: int, shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Fresh parameters created directly in their shards (never whole on one host).
    The partitionable threefry PRNG makes the values independent of the mesh."""
    def init():
        return params_io.flat_params(Olmo2Model(spec.cfg, rngs=nnx.Rngs(seed),
                                                scan_layers=spec.scan_layers))
    return jax.jit(init, out_shardings=shardings)()
