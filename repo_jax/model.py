"""OLMo-2 with RePo context re-positioning, in Flax NNX.

Reads top to bottom: RMSNorm -> RePo positioner -> Attention -> MLP -> Block ->
Olmo2Model. Parameter names follow Hugging Face (`embed_tokens`,
`layers.N.self_attn.q_proj`, ...) so conversion is mostly renames; Flax kernels
are [in, out]. Every parameter carries logical axis names (`logical_axes`
metadata) that `repo_jax.sharding` maps onto a device mesh.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from repo_jax.attention import attend
from repo_jax.config import ModelConfig
from repo_jax.linear import FlatLinear, copied_grad_dot_general
from repo_jax.rope import apply_rope_qk
from repo_jax.sharding import constrain

# Logical axes of the hidden states [B, T, d] between blocks (see repo_jax.sharding).
HIDDEN = ("batch", "seq", "act_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _init(cfg: ModelConfig):
    # OLMo-2 and the RePo recipe: truncated normal, std 0.02, cut at +-3 std.
    return nnx.initializers.truncated_normal(stddev=cfg.init_std, lower=-3.0, upper=3.0)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], rngs: nnx.Rngs,
            dtype: Any = None, dot_general=copied_grad_dot_general) -> nnx.Linear:
    return FlatLinear(d_in, d_out, use_bias=False, dtype=dtype or cfg.dtype, dot_general=dot_general,
                      param_dtype=cfg.param_dtype, kernel_init=_init(cfg),
                      kernel_metadata={"logical_axes": axes}, rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm with statistics in float32 and a learned `weight` (HF layout)."""

    def __init__(self, dim: int, eps: float, param_dtype: str, axis: str = "norm"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * y).astype(x.dtype)


class LayerContext(NamedTuple):
    """Per-call arrays every block needs (see `repo_jax.attention` for the rule)."""
    positions: jnp.ndarray    # float32 [B, T] integer RoPE positions
    q_index: jnp.ndarray      # int32 [B, T]
    kv_index: jnp.ndarray     # int32 [B, S]
    q_segment: jnp.ndarray    # int32 [B, T]
    kv_segment: jnp.ndarray   # int32 [B, S]
    cache_start: jnp.ndarray | None  # int32 scalar: where new keys go in the cache


class LayerCache(NamedTuple):
    k: jnp.ndarray  # [B, S, KV, head_dim], keys stored after rotation
    v: jnp.ndarray


class Attention(nnx.Module):
    """Self-attention with QK-norm over the full projections and, on RePo layers,
    the positioner f_phi: z = final_map(silu(gate_map(x)) * content_map(x))."""

    def __init__(self, cfg: ModelConfig, is_repo: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.is_repo = is_repo
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = _linear(cfg, d, h * hd, ("embed", "heads"), rngs)
        self.k_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), rngs)
        self.v_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), rngs)
        self.o_proj = _linear(cfg, h * hd, d, ("heads", "embed"), rngs)
        self.q_norm = RMSNorm(h * hd, cfg.rms_norm_eps, cfg.param_dtype, "heads")
        self.k_norm = RMSNorm(kv * hd, cfg.rms_norm_eps, cfg.param_dtype, "kv_heads")
        if is_repo:
            r = cfg.repo_hidden_size
            # The positioner runs in float32: its output is a position in the thousands.
            self.gate_map = _linear(cfg, d, r, ("embed", "repo"), rngs, jnp.float32)
            self.content_map = _linear(cfg, d, r, ("embed", "repo"), rngs, jnp.float32)
            # final_map's weight gradient is an [r, H] dot: the copied [r, B*T] input that
            # `copied_grad_dot_general` would make for it cost more on XLA:CPU than the
            # slower dot form it avoids (6.5 ms of the repo-heavy case's step, 7 layers).
            self.final_map = _linear(cfg, r, h, ("repo", "repo_heads"), rngs, jnp.float32,
                                     dot_general=jax.lax.dot_general)

    def repo_positions(self, x: jnp.ndarray) -> jnp.ndarray:
        """Block input x [B, T, d] (no norm) -> float32 positions [B, T, H]."""
        b, t, d = x.shape
        # gate_map and content_map as one [d, 2r] product (parameters stay separate, as
        # in the checkpoints): one pass over x and one dot each for the product, the
        # input gradient and the weight gradient instead of two; on XLA:CPU these
        # narrow dots run far below the rate of the model's wide ones.
        kernel = jnp.concatenate([self.gate_map.kernel[...], self.content_map.kernel[...]], axis=1)
        gc = copied_grad_dot_general(x.reshape(b * t, d).astype(jnp.float32), kernel.astype(jnp.float32),
                                     (((1,), (0,)), ((), ())))
        gate, content = jnp.split(gc.reshape(b, t, -1), 2, axis=-1)
        z = self.final_map(jax.nn.silu(gate) * content)
        chex.assert_shape(z, (*x.shape[:2], self.cfg.num_attention_heads))
        return z

    def __call__(self, x, ctx: LayerContext, rotate: bool | jnp.ndarray, cache: LayerCache | None):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x)).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_norm(self.k_proj(x)).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = constrain(q, ("batch", "seq", "heads", None))
        k = constrain(k, ("batch", "seq", "kv_heads", None))
        v = constrain(v, ("batch", "seq", "kv_heads", None))
        # Each head's positions live with that head (tensor-split like q).
        z = constrain(self.repo_positions(x), ("batch", "seq", "heads")) if self.is_repo else None
        # `rotate` is False on NoPE layers: a Python bool when known at trace time (no RoPE
        # work at all on NoPE layers), an array when scanned layers differ.
        if rotate is not False:
            # Positions per token and head [B, T, H] on RePo layers, per token [B, T, 1]
            # otherwise (one cos/sin table for all heads).
            positions = ctx.positions[:, :, None] if z is None else z
            q_rot, k_rot = apply_rope_qk(q, k, positions, cfg)
            q = q_rot if rotate is True else jnp.where(rotate, q_rot, q)
            k = k_rot if rotate is True else jnp.where(rotate, k_rot, k)
        if cache is not None:
            start = (0, ctx.cache_start, 0, 0)
            k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
            v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
            cache = LayerCache(k_all, v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        out = attend(q, k, v, q_index=ctx.q_index, kv_index=ctx.kv_index,
                     q_segment=ctx.q_segment, kv_segment=ctx.kv_segment,
                     impl=cfg.attention_impl, block_size=cfg.attention_block_size)
        chex.assert_shape(out, (b, t, cfg.num_attention_heads, cfg.head_dim))
        out = constrain(out, ("batch", "seq", "heads", None))
        return self.o_proj(out.reshape(b, t, -1)), z, cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, i, ("embed", "mlp"), rngs)
        self.up_proj = _linear(cfg, d, i, ("embed", "mlp"), rngs)
        self.down_proj = _linear(cfg, i, d, ("mlp", "embed"), rngs)

    def __call__(self, x):
        hidden = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("batch", "seq", "mlp"))
        return self.down_proj(hidden)


class Block(nnx.Module):
    """Post-norm OLMo-2 block: h = x + norm(attn(x)); out = h + norm(mlp(h))."""

    def __init__(self, cfg: ModelConfig, is_repo: bool, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, is_repo, rngs)
        self.mlp = MLP(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)

    def __call__(self, x, ctx: LayerContext, rotate, cache: LayerCache | None):
        x = constrain(x, HIDDEN)
        a, z, cache = self.self_attn(x, ctx, rotate, cache)
        h = x + self.post_attention_layernorm(a)
        out = h + self.post_feedforward_layernorm(self.mlp(h))
        return constrain(out, HIDDEN), z, cache


class ModelOutput(NamedTuple):
    logits: jnp.ndarray                    # float32 [B, T, V]
    positions: dict[int, jnp.ndarray]      # RePo layer -> float32 [B, H, T]
    cache: "KVCache | None"


class KVCache(NamedTuple):
    """Preallocated cache for all layers: k/v [L, B, S, KV, hd], segment [B, S],
    and `end`, the number of filled slots (the same for every row)."""
    k: jnp.ndarray
    v: jnp.ndarray
    segment: jnp.ndarray
    end: jnp.ndarray


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    # Unfilled slots get segment -2, which no query ever has.
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.full((batch, max_len), -2, jnp.int32), jnp.zeros((), jnp.int32))


def layer_groups(cfg: ModelConfig) -> list[list[int]]:
    """Runs of consecutive layers with the same parameter structure (RePo or not):
    the units that `scan_layers` stacks."""
    groups: list[list[int]] = []
    for i, s in enumerate(cfg.layer_schemes):
        if groups and (cfg.layer_schemes[groups[-1][0]] == "repo") == (s == "repo"):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Olmo2Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, scan_layers: bool = False):
        self.config = cfg
        # Execution choice only: the parameter tree is the same either way.
        self.scan_layers = scan_layers
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_init(cfg), embedding_metadata={"logical_axes": ("vocab", "embed")},
            rngs=rngs)
        self.layers = nnx.List([Block(cfg, s == "repo", rngs) for s in cfg.layer_schemes])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs)

    def __call__(self, input_ids: jnp.ndarray, *, return_positions: bool = False, **kwargs):
        """int32 [B, T] -> float32 logits [B, T, V] (and the RePo positions if asked)."""
        out = self.forward(input_ids, **kwargs)
        return (out.logits, out.positions) if return_positions else out.logits

    def forward(self, input_ids: jnp.ndarray, *, position_ids: jnp.ndarray | None = None,
                segment_ids: jnp.ndarray | None = None,
                attention_mask: jnp.ndarray | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """Full forward. `segment_ids` separate packed documents; `attention_mask`
        (1 = token, 0 = padding) hides padding; with `cache`, the T new tokens are
        written at slots [cache.end, cache.end + T) and attend to everything before.
        `logits_to_keep=N > 0` returns logits for the last N tokens only (a prefill needs
        one: the [T, V] float32 logits of a 16K prompt alone would take 6.6 GB)."""
        cfg = self.config
        x, positions, new_cache = self.hidden(input_ids, position_ids=position_ids,
                                              segment_ids=segment_ids, attention_mask=attention_mask,
                                              cache=cache, logits_to_keep=logits_to_keep)
        logits = self.project(x)
        b, t = input_ids.shape
        chex.assert_shape(logits, (b, min(logits_to_keep, t) or t, cfg.vocab_size))
        return ModelOutput(logits, positions, new_cache)

    def hidden(self, input_ids: jnp.ndarray, *, position_ids=None, segment_ids=None,
               attention_mask=None, cache: KVCache | None = None, logits_to_keep: int = 0):
        """`forward` up to the final norm: (hidden [B, T or logits_to_keep, d], RePo
        positions, new cache). Training projects it in chunks (train/vocab_tiling.py)."""
        cfg = self.config
        chex.assert_rank(input_ids, 2)
        b, t = input_ids.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.end
        q_index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if position_ids is None:
            position_ids = q_index
        segment = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        if attention_mask is not None:
            segment = jnp.where(attention_mask.astype(bool), segment, -1)
        if cache is None:
            kv_index, kv_segment = q_index, segment
        else:
            kv_segment = jax.lax.dynamic_update_slice(cache.segment, segment, (0, cache.end))
            kv_index = jnp.broadcast_to(jnp.arange(cache.segment.shape[1], dtype=jnp.int32),
                                        cache.segment.shape)
        ctx = LayerContext(position_ids.astype(jnp.float32), q_index, kv_index, segment,
                           kv_segment, None if cache is None else cache.end)

        x = constrain(self.embed_tokens(input_ids), HIDDEN)
        positions: dict[int, jnp.ndarray] = {}
        new_k, new_v = [], []
        for group in layer_groups(cfg) if self.scan_layers else [[i] for i in range(len(self.layers))]:
            layer_cache = None if cache is None else LayerCache(cache.k[group[0]:group[-1] + 1],
                                                                cache.v[group[0]:group[-1] + 1])
            x, zs, layer_cache = self._run_group(group, x, ctx, layer_cache)
            if cache is not None:
                new_k.append(layer_cache.k)
                new_v.append(layer_cache.v)
            if zs is not None:
                for j, i in enumerate(group):
                    positions[i] = jnp.swapaxes(zs[j], 1, 2)  # [B, H, T]
        x = self.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(jnp.concatenate(new_k), jnp.concatenate(new_v), kv_segment,
                                cache.end + t)
        return x, positions, new_cache

    def project(self, x: jnp.ndarray) -> jnp.ndarray:
        """Final hidden states [B, T, d] -> float32 logits [B, T, V] (vocab over tensor)."""
        b, t, _ = x.shape
        # The vocabulary projection on [B*T, d]: XLA:CPU computes the weight gradient of a
        # 3-D x 2-D dot as one product per sequence, then sums them: 2.5x slower at vocab 100k.
        h = x.reshape(b * t, -1)
        logits = self.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return constrain(logits.reshape(b, t, -1).astype(jnp.float32), ("batch", "seq", "vocab"))

    def _run_group(self, group: list[int], x, ctx: LayerContext, cache: LayerCache | None):
        """Run layers `group` (same structure). One layer is called directly; more
        are stacked and run under `jax.lax.scan` so XLA compiles one body."""
        cfg = self.config
        rotate = [cfg.layer_schemes[i] != "nope" for i in group]
        # Static when the whole group agrees, so that the trace holds no RoPE for NoPE layers.
        static_rotate = rotate[0] if len(set(rotate)) == 1 else None
        rotate = jnp.asarray(rotate)
        graphdef, _ = nnx.split(self.layers[group[0]])

        def body(x, state, rot, layer_cache):
            block = nnx.merge(graphdef, state)
            return block(x, ctx, rot if static_rotate is None else static_rotate, layer_cache)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=len(group) == 1)
        if len(group) == 1:
            state = nnx.state(self.layers[group[0]])
            one = None if cache is None else LayerCache(cache.k[0], cache.v[0])
            x, z, one = body(x, state, rotate[0], one)
            stacked = None if one is None else LayerCache(one.k[None], one.v[None])
            return x, None if z is None else z[None], stacked
        states = [nnx.state(self.layers[i]) for i in group]
        stacked_state = jax.tree.map(lambda *a: jnp.stack(a), *states)

        def step(x, xs):
            state, rot, layer_cache = xs
            x, z, layer_cache = body(x, state, rot, layer_cache)
            return x, (z, layer_cache)

        x, (zs, cache) = jax.lax.scan(step, x, (stacked_state, rotate, cache))
        return x, zs, cache
