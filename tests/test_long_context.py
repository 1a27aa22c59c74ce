"""Long context: the blockwise (memory-linear) attention path against the XLA
reference, and YaRN against transformers, an independent formula and the torch
RePo reference, through checkpoints and config.json."""
from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized
from flax import nnx

import repo_jax as rj
from convert import torch_reference
from repo_jax.attention import attend
from repo_jax.hf_format import config_from_hf, config_to_hf
from repo_jax.model import init_cache
from repo_jax.rope import inv_frequencies
from tests.conftest import SMALL, add_repo_maps, hf_olmo2, write_hf_dir


# ---- blockwise attention ---------------------------------------------------------------
def _qkv(rng, b, tq, tk, h, kv, d=8):
    return (jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, tk, kv, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, tk, kv, d)), jnp.float32))


def _attention_loss(impl, block, **rule):
    def loss(q, k, v):
        out = attend(q, k, v, impl=impl, block_size=block, **rule)
        # A non-linear read-out so that every output element gets its own cotangent.
        return jnp.sum(jnp.sin(out) * out), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


class BlockwiseTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((4, 8), (2, 16), (1, 512))
    def test_packed_padded_sequences(self, kv, block):
        """Left padding (segment -1), two packed documents, T not a multiple of the block."""
        rng = np.random.default_rng(kv * 100 + block)
        q, k, v = _qkv(rng, 2, 37, 37, 4, kv)
        index = jnp.broadcast_to(jnp.arange(37), (2, 37))
        segment = jnp.asarray([[-1] * 5 + [1] * 15 + [2] * 17, [-1] * 2 + [7] * 35])
        rule = dict(q_index=index, kv_index=index, q_segment=segment, kv_segment=segment)
        (_, want), want_grads = _attention_loss("xla", 512, **rule)(q, k, v)
        (_, got), got_grads = self.variant(_attention_loss("blockwise", block, **rule))(q, k, v)
        chex.assert_trees_all_close(got, want, atol=2e-6)
        chex.assert_trees_all_close(got_grads, want_grads, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_queries_against_a_part_filled_cache(self):
        """Three new queries at slots 9..11 of a 20-slot cache (unfilled slots: segment -2)."""
        rng = np.random.default_rng(3)
        q, k, v = _qkv(rng, 2, 3, 20, 4, 2)
        q_index = jnp.broadcast_to(9 + jnp.arange(3), (2, 3))
        kv_index = jnp.broadcast_to(jnp.arange(20), (2, 20))
        kv_segment = jnp.asarray([[-1] * 4 + [0] * 8 + [-2] * 8, [0] * 12 + [-2] * 8])
        rule = dict(q_index=q_index, kv_index=kv_index, q_segment=jnp.zeros((2, 3), jnp.int32),
                    kv_segment=kv_segment)
        (_, want), want_grads = _attention_loss("xla", 512, **rule)(q, k, v)
        (_, got), got_grads = self.variant(_attention_loss("blockwise", 4, **rule))(q, k, v)
        chex.assert_trees_all_close(got, want, atol=2e-6)
        chex.assert_trees_all_close(got_grads, want_grads, atol=1e-5)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation (at any nesting depth) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


def test_blockwise_never_builds_the_full_score_matrix():
    """Memory-linear by construction: neither the forward nor the backward pass of the
    blockwise path creates an array as large as the [B, H, T, T] scores, which the
    XLA path does."""
    b, t, h, block = 1, 512, 4, 32
    q, k, v = _qkv(np.random.default_rng(0), b, t, t, h, h)
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    rule = dict(q_index=index, kv_index=index, q_segment=jnp.zeros((b, t), jnp.int32),
                kv_segment=jnp.zeros((b, t), jnp.int32))
    full = b * h * t * t
    xla = _largest_intermediate(jax.make_jaxpr(_attention_loss("xla", 512, **rule))(q, k, v).jaxpr)
    blockwise = _largest_intermediate(
        jax.make_jaxpr(_attention_loss("blockwise", block, **rule))(q, k, v).jaxpr)
    assert xla >= full
    assert blockwise <= full // 8, (blockwise, full)


def _repo_model(**overrides):
    cfg = rj.ModelConfig(**{**SMALL, **overrides}).replace(repo_start_layer=2)
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(0))
    for i in cfg.repo_layers:  # spread positions so that errors show
        a = model.layers[i].self_attn
        a.final_map.kernel[...] = a.final_map.kernel[...] * 50.0
    return model


def _with_impl(model, **overrides):
    """The same parameters under another config (e.g. attention_impl)."""
    other = rj.Olmo2Model(model.config.replace(**overrides), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(model))
    return other


def test_blockwise_model_matches_xla_model_logits_cache_and_gradients():
    xla = _repo_model()
    blockwise = _with_impl(xla, attention_impl="blockwise", attention_block_size=8)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 30)), jnp.int32)
    mask = jnp.asarray([[0] * 6 + [1] * 24, [1] * 30])
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)

    def run(model):
        """Logits, RePo positions and parameter gradients of a padded batch, and the
        logits of a prefill of 21 tokens followed by 9 one-token cache steps."""
        graphdef, state = nnx.split(model)

        @jax.jit
        def padded(state):
            def loss(state):
                out = nnx.merge(graphdef, state).forward(ids, attention_mask=mask, position_ids=pos)
                return jnp.mean(out.logits ** 2), out
            return jax.grad(loss, has_aux=True)(state)

        @jax.jit
        def cached(state, x, cache):
            return nnx.merge(graphdef, state).forward(x, cache=cache)

        grads, out = padded(state)
        step = cached(state, ids[:, :21], init_cache(model.config, 2, 32))
        chunks = [step.logits]
        for i in range(21, 30):
            step = cached(state, ids[:, i:i + 1], step.cache)
            chunks.append(step.logits)
        return out, grads, jnp.concatenate(chunks, 1)

    want, want_grads, want_cached = run(xla)
    got, got_grads, got_cached = run(blockwise)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    np.testing.assert_allclose(got.positions[3], want.positions[3], atol=1e-4)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-6)
    np.testing.assert_allclose(got_cached, want_cached, atol=1e-4)
    np.testing.assert_allclose(want_cached, xla(ids), atol=1e-4)  # the cache is exact too


def test_blockwise_greedy_generation_equals_xla():
    xla = _repo_model()
    blockwise = _with_impl(xla, attention_impl="blockwise", attention_block_size=4)
    prompt = np.random.default_rng(6).integers(0, 256, (2, 9))
    np.testing.assert_array_equal(rj.generate(blockwise, prompt, 6), rj.generate(xla, prompt, 6))


# ---- YaRN -------------------------------------------------------------------------------
def _yarn_reference(head_dim, theta, factor, original, beta_fast, beta_slow):
    """YaRN from its definition (Peng et al. 2023, and the authors' code): dimension
    pair i turns original * f_i / 2pi times over the original context; pairs that turn
    more than beta_fast times keep f_i, fewer than beta_slow are interpolated to
    f_i / factor, with a linear blend over the (whole) pair indices in between; cos and
    sin are scaled by 0.1 ln(factor) + 1."""
    pairs = head_dim // 2

    def pair_turning(times):  # the (fractional) pair index that turns `times` times
        return pairs * math.log(original / (2 * math.pi * times)) / math.log(theta)

    low = max(math.floor(pair_turning(beta_fast)), 0)
    high = min(math.ceil(pair_turning(beta_slow)), head_dim - 1)
    out = []
    for i in range(pairs):
        f = theta ** (-2 * i / head_dim)
        interpolated_share = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)
        out.append(f * (1 - interpolated_share) + f / factor * interpolated_share)
    return np.asarray(out), 0.1 * math.log(factor) + 1.0


@pytest.mark.parametrize("head_dim,theta,factor,original,fast,slow", [
    (16, 500000.0, 4.0, 64, 32.0, 1.0), (64, 10000.0, 8.0, 512, 32.0, 1.0),
    (128, 500000.0, 4.0, 4096, 32.0, 1.0), (128, 500000.0, 2.0, 4096, 16.0, 2.0)])
def test_yarn_frequencies_match_transformers_and_the_definition(head_dim, theta, factor,
                                                               original, fast, slow):
    from transformers import Olmo2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = rj.ModelConfig(**{**SMALL, "hidden_size": head_dim * 4}, rope_theta=theta,
                         rope_scaling_factor=factor, original_max_position_embeddings=original,
                         yarn_beta_fast=fast, yarn_beta_slow=slow)
    ours, scale = inv_frequencies(cfg)
    want, want_scale = _yarn_reference(head_dim, theta, factor, original, fast, slow)
    np.testing.assert_allclose(ours, want, rtol=1e-6)
    assert scale == pytest.approx(want_scale)
    hf = Olmo2Config(**config_to_hf(cfg))
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, None)
    np.testing.assert_allclose(ours, hf_inv.numpy(), rtol=1e-5)
    assert scale == pytest.approx(hf_scale)
    # The fastest pair is untouched, the slowest fully interpolated.
    plain, _ = inv_frequencies(cfg.replace(rope_scaling_factor=1.0))
    assert ours[0] == pytest.approx(plain[0])
    assert ours[-1] == pytest.approx(plain[-1] / factor, rel=1e-6)


def test_yarn_logits_match_transformers_past_the_original_length(tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
            "original_max_position_embeddings": 64}
    hf = hf_olmo2(num_key_value_heads=2, rope_parameters=rope)
    hf.save_pretrained(tmp_path)
    model = rj.load_model(tmp_path)
    assert (model.config.rope_scaling_factor, model.config.original_max_position_embeddings) == (4.0, 64)
    ids = np.random.default_rng(7).integers(0, 256, (1, 150))  # past 64 tokens
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids, jnp.int32))) - want).max() < 1e-4
    plain = _with_impl(model, rope_scaling_factor=1.0)
    assert np.abs(np.asarray(plain(jnp.asarray(ids, jnp.int32))) - want).max() > 1e-3


def test_yarn_applies_to_repo_positions(tmp_path):
    """RePo's learned (real-valued) positions go through the same YaRN frequencies:
    logits and positions match the torch reference, and differ from plain RoPE."""
    cfg = rj.ModelConfig(**SMALL, rope_scaling_factor=4.0,
                         original_max_position_embeddings=16).replace(repo_start_layer=1)
    sd = add_repo_maps(dict(hf_olmo2().state_dict()), cfg)
    model = rj.load_model(write_hf_dir(tmp_path / "repo", sd, cfg))
    assert model.config == cfg
    ids = np.random.default_rng(8).integers(0, 256, (2, 40))
    logits, positions = model(jnp.asarray(ids, jnp.int32), return_positions=True)
    ref_logits, ref_positions = torch_reference.forward(sd, cfg, torch.from_numpy(ids))
    assert np.abs(np.asarray(logits) - ref_logits.numpy()).max() < 1e-4
    for layer in cfg.repo_layers:
        np.testing.assert_allclose(positions[layer], ref_positions[layer].numpy(), atol=1e-4, rtol=1e-5)
    # RePo positions here exceed the original 16, where YaRN changes the rotation.
    assert float(jnp.abs(positions[3]).max()) > 2 * 16
    plain_ref, _ = torch_reference.forward(sd, cfg.replace(rope_scaling_factor=1.0),
                                           torch.from_numpy(ids))
    assert np.abs(plain_ref.numpy() - ref_logits.numpy()).max() > 1e-3


def test_yarn_survives_model_directory_and_config_json(tmp_path):
    from repo_jax import params_io

    model = _repo_model(rope_scaling_factor=8.0, original_max_position_embeddings=32,
                        yarn_beta_fast=16.0, yarn_beta_slow=2.0)
    params_io.save_params(tmp_path, params_io.flat_params(model))
    params_io.write_meta(tmp_path, model.config, {"source": "test"})
    loaded = rj.load_model(tmp_path)
    assert loaded.config == model.config
    ids = jnp.asarray(np.random.default_rng(9).integers(0, 256, (1, 70)), jnp.int32)
    np.testing.assert_array_equal(loaded(ids), model(ids))

    hf = config_to_hf(model.config)
    assert hf["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                                     "original_max_position_embeddings": 32, "beta_fast": 16.0,
                                     "beta_slow": 2.0}
    back = config_from_hf(json.loads(json.dumps(hf)), weight_repo_layers=model.config.repo_layers)
    assert back == model.config


@pytest.mark.parametrize("rope,needle", [
    ({"rope_type": "linear", "factor": 2.0}, "rope_type='linear' is not supported"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
      "attention_factor": 1.5}, "YaRN options {'attention_factor': 1.5} are not supported"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
      "truncate": False}, "YaRN options {'truncate': False}"),
    ({"rope_type": "yarn", "factor": 2.0}, "needs original_max_position_embeddings"),
])
def test_unsupported_rope_scaling_is_refused(rope, needle):
    hf = config_to_hf(rj.ModelConfig(**SMALL))
    hf["rope_parameters"] = {"rope_theta": 500000.0, **rope}
    with pytest.raises(rj.FormatError, match=needle.replace("(", r"\(").replace("[", r"\[")
                       .replace("{", r"\{")):
        config_from_hf(hf)


def test_yarn_factor_defaults_to_the_stretch_transformers_uses():
    hf = config_to_hf(rj.ModelConfig(**SMALL))
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500000.0,
                             "original_max_position_embeddings": 64}
    assert config_from_hf(hf).rope_scaling_factor == SMALL["max_position_embeddings"] / 64
