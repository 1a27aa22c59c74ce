"""Device mesh and the ONE logical-axis rules table.

Parameters carry logical axis names (`logical_axes` metadata, see
`repo_jax/model.py`); activations are named inside the model with `constrain`
(hidden states at every block boundary, heads, MLP hidden, RePo positions,
logits). Both map onto the mesh axes `data`, `fsdp`, `tensor` through `RULES`
and nothing else:

  data    pure data parallelism: parameters replicated, batch split
  fsdp    data parallelism with parameters (and optimizer state) split along
          `embed` (ZeRO-3); XLA gathers them for each matmul
  tensor  Megatron-style model parallelism over heads, MLP and vocabulary
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from repo_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None: replicated). The one table.
RULES: dict[str, tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "accum": None,        # the micro-batch axis of a gradient-accumulation step
    "seq": None,
    # The model dimension of activations stays whole: fsdp splits their batch instead.
    # (Parameters' `embed` goes over fsdp; the same name here would gather the batch.)
    "act_embed": None,
    # parameters (names used in repo_jax/model.py)
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
    "repo": None,         # RePo's d/8 bottleneck: small, replicated
    "repo_heads": None,
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 ("the rest") and check that the sizes multiply to the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices cannot be split with "
                              f"data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}; "
                              f"make the fixed sizes divide {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = "
                          f"{int(np.prod(sizes))} but there are {num_devices} devices; "
                          "set one of mesh.data/fsdp/tensor to -1 or make them multiply to it")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: XLA's partitioner propagates shardings from the parameters, the batch
    # and the activation pins of `constrain`.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array with logical `axes`. A mesh axis is used at most once,
    and only where it divides the dimension (else that dimension stays replicated:
    e.g. a 4-head model on tensor=8); `unsharded_dims` reports those cases."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in repo_jax.sharding.RULES")
        chosen = []
        for ax in RULES.get(name) or ():
            size = mesh.shape[ax]
            if size > 1 and ax not in used and dim % (size * int(np.prod([mesh.shape[a] for a in chosen]))) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the logical `axes` on the mesh of the enclosing
    `jax.set_mesh` (the train and eval steps trace under one). Without a mesh, as in
    generation and the parity tests, it does nothing. Parameter shardings alone let XLA
    keep the whole batch on every chip under fsdp; these pins split it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh))


def unsharded_dims(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> list[str]:
    """Logical dims that the rules would split but the mesh size does not divide."""
    spec = logical_spec(axes, shape, mesh)
    out = []
    for name, dim, got in zip(axes, shape, spec):
        wanted = [a for a in (RULES.get(name) or ()) if mesh.shape[a] > 1]
        got = (got,) if isinstance(got, str) else tuple(got or ())
        if len(got) < len(wanted):
            out.append(f"{name}={dim}")
    return out


def named(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def param_shardings(abstract: dict[str, Any], axes: dict[str, tuple[str, ...]],
                    mesh: Mesh) -> dict[str, NamedSharding]:
    """Flat parameter dict (ShapeDtypeStructs) + their logical axes -> shardings."""
    return {k: named(mesh, axes[k], v.shape) for k, v in abstract.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches are [accum, batch, seq]."""
    return NamedSharding(mesh, P(None, RULES["batch"], None))


def batch_parallelism(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in RULES["batch"]]))


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int = 1) -> tuple[int, int]:
    """The contiguous range of `axis` that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(global_shape)
    starts, stops = [], []
    for index in index_map.values():
        s = index[axis]
        starts.append(s.start or 0)
        stops.append(global_shape[axis] if s.stop is None else s.stop)
    lo, hi = min(starts), max(stops)
    covered = set()
    for a, b in zip(starts, stops):
        covered.update(range(a, b))
    if covered != set(range(lo, hi)):
        raise RuntimeError("this process's batch rows are not contiguous; use a mesh whose "
                           "data/fsdp axes follow process order")
    return lo, hi


def global_batch(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """Assemble the global batch from each process's own rows (no host holds it all)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)
