"""The jitted training and eval steps: pure functions over (graphdef, flat params).

One `jax.jit` per step function; the NNX model is rebuilt from the flat params
inside the trace (`ModelSpec.merge`), never with `nnx.jit` per call. Gradient
accumulation runs the micro-batches under `jax.lax.scan` inside that one jit.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from repo_jax import sharding as shd
from repo_jax.train.state import ModelSpec, TrainState
from repo_jax.train.vocab_tiling import tiled_lm_loss


def _forward_loss(spec: ModelSpec, mesh: Mesh, params, tokens, loss_chunk: int, loss_mask=None):
    # The model's activation pins (`shd.constrain`) and kernels that need shard_map
    # (splash attention) resolve against this mesh.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        model = spec.merge(params)
        hidden, _, _ = model.hidden(tokens)
        return tiled_lm_loss(model.project, hidden, tokens, loss_chunk, loss_mask)


def _unpack(batch) -> tuple[jax.Array, jax.Array | None]:
    """A batch is tokens [accum, micro, T], or {"tokens", "loss_mask"} for a masked loss."""
    if isinstance(batch, dict):
        return batch["tokens"], batch["loss_mask"]
    return batch, None


def make_train_step(spec: ModelSpec, tx: optax.GradientTransformation, sched: optax.Schedule,
                    z_loss: float, mesh: Mesh, state_shardings: Any, loss_chunk: int = 0) -> Callable:
    """(state, tokens int32 [accum, micro, T] or {"tokens", "loss_mask"}) -> (state, metrics),
    state donated. `loss_chunk` > 0: the loss's logits exist that many positions at a time."""

    def loss_fn(params, tokens, loss_mask=None, share=None):
        ce, z = _forward_loss(spec, mesh, params, tokens, loss_chunk, loss_mask)
        if share is not None:
            ce, z = ce * share, z * share
        return ce + z_loss * z, (ce, z)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch):
        tokens, mask = _unpack(batch)
        accum = tokens.shape[0]
        if accum == 1:
            (_, (ce, z)), grads = grad_fn(state.params, tokens[0], None if mask is None else mask[0])
        else:
            if mask is None:
                xs = (tokens,)
            else:
                # Masked micro-batches hold different numbers of targets: weighting each
                # mean by its share of them makes the mean of means the mean over all.
                counts = jnp.sum(mask[:, :, 1:], axis=(1, 2))
                xs = (tokens, mask, counts * accum / jnp.maximum(jnp.sum(counts), 1.0))

            def micro(carry, x):
                g_sum, ce_sum, z_sum = carry
                (_, (ce, z)), g = grad_fn(state.params, *x)
                return (jax.tree.map(jnp.add, g_sum, g), ce_sum + ce, z_sum + z), None

            zeros = jax.lax.with_sharding_constraint(
                jax.tree.map(jnp.zeros_like, state.params), state_shardings.params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, ce, z), _ = jax.lax.scan(micro, init, xs)
            # Every micro-batch counts the same (unmasked: the same number of targets).
            grads = jax.tree.map(lambda g: g / accum, grads)
            ce, z = ce / accum, z / accum
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "z_loss": z_loss * z, "grad_norm": grad_norm,
                   "lr": sched(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    batch_sharding = shd.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)


def make_eval_step(spec: ModelSpec, mesh: Mesh, param_shardings: dict[str, NamedSharding],
                   loss_chunk: int = 0) -> Callable:
    """(params, tokens [1, micro, T]) -> mean cross-entropy."""

    def evaluate(params, batch):
        tokens, mask = _unpack(batch)
        ce, _ = _forward_loss(spec, mesh, params, tokens[0], loss_chunk,
                              None if mask is None else mask[0])
        return ce

    return jax.jit(evaluate, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                   out_shardings=shd.replicated(mesh))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: dict,
                        param_shardings: dict[str, NamedSharding], mesh: Mesh) -> Any:
    """Moments shard like their parameters; counts and other scalars are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                 transform_non_params=lambda _: shd.replicated(mesh))
