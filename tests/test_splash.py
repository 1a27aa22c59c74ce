"""Splash attention (the Pallas TPU kernel) against the `xla` path, run on CPU by the
Pallas interpreter (attention_impl="splash_interpret"): values and gradients, grouped
query heads, packed and padded documents, sharded with shard_map on fake devices,
through the model; and, when libtpu is installed, compiled for a TPU topology."""
from __future__ import annotations

import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import repo_jax as rj
from repo_jax import sharding as shd
from repo_jax.attention import attend
from repo_jax.config import ConfigError, MeshConfig
from repo_jax.model import init_cache
from tests.conftest import SMALL


def _qkv(rng, b, t, h, kv, d=16):
    return tuple(jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))


def _rule(segment):
    index = jnp.broadcast_to(jnp.arange(segment.shape[1]), segment.shape)
    return dict(q_index=index, kv_index=index, q_segment=segment, kv_segment=segment)


def _value_and_grads(impl, block, rule):
    def loss(q, k, v):
        out = attend(q, k, v, impl=impl, block_size=block, **rule)
        # A non-linear read-out so that every output element gets its own cotangent.
        return jnp.sum(jnp.sin(out) * out), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


# Left padding (segment -1) and packed documents; T=200 is not a multiple of the tile.
SEGMENTS = jnp.asarray([[-1] * 30 + [1] * 90 + [2] * 80, [5] * 128 + [6] * 72], jnp.int32)


class SplashKernelTest(parameterized.TestCase):
    @chex.variants(with_jit=True)
    @parameterized.parameters((4, 4, 128), (4, 2, 256), (4, 1, 128))
    def test_matches_xla(self, heads, kv_heads, block):
        rng = np.random.default_rng(heads * 10 + kv_heads)
        q, k, v = _qkv(rng, 2, 200, heads, kv_heads)
        rule = _rule(SEGMENTS)
        (_, want), want_grads = jax.jit(_value_and_grads("xla", 512, rule))(q, k, v)
        (_, got), got_grads = self.variant(_value_and_grads("splash_interpret", block, rule))(q, k, v)
        chex.assert_trees_all_close(got, want, atol=1e-5)
        chex.assert_trees_all_close(got_grads, want_grads, atol=1e-4)

    def test_sharded_over_batch_and_heads(self):
        """8 fake devices, data=2 x fsdp=2 x tensor=2: each shard runs the kernel on its
        own rows and heads (shard_map), and the result is still the xla one."""
        mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        rng = np.random.default_rng(7)
        q, k, v = _qkv(rng, 4, 128, 4, 2)
        segment = jnp.asarray(np.repeat([[0, 1]], 4, 0).repeat(64, 1), jnp.int32)
        rule = _rule(segment)
        (_, want), want_grads = jax.jit(_value_and_grads("xla", 512, rule))(q, k, v)
        rows = shd.named(mesh, ("batch",), (4,))
        q, k, v = jax.device_put((q, k, v), rows)
        rule = jax.device_put(rule, rows)
        fn = jax.jit(_value_and_grads("splash_interpret", 128, rule))
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
            (_, got), got_grads = fn(q, k, v)
        self.assertIn("shard_map", jaxpr)
        self.assertIn("P(('data', 'fsdp'), 'tensor', None, None)", jaxpr)
        chex.assert_trees_all_close(got, want, atol=1e-5)
        chex.assert_trees_all_close(got_grads, want_grads, atol=1e-4)

    def test_refuses_kv_cache_decoding(self):
        rng = np.random.default_rng(0)
        q, k, v = _qkv(rng, 1, 1, 2, 2)
        k, v = jnp.tile(k, (1, 128, 1, 1)), jnp.tile(v, (1, 128, 1, 1))
        one, full = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 128), jnp.int32)
        with self.assertRaisesRegex(ValueError, "1 queries against 128 keys.*'xla' or 'blockwise'"):
            attend(q, k, v, q_index=one, kv_index=full, q_segment=one, kv_segment=full, impl="splash")

    def test_splash_does_not_run_off_tpu(self):
        """"splash" is the TPU kernel: on CPU it fails to lower rather than quietly
        running the slow interpreter (that takes "splash_interpret", explicitly)."""
        q, k, v = _qkv(np.random.default_rng(0), 1, 128, 2, 2)
        rule = _rule(jnp.zeros((1, 128), jnp.int32))
        with self.assertRaisesRegex(ValueError, "Only interpret mode is supported on CPU"):
            jax.jit(lambda q, k, v: attend(q, k, v, impl="splash", **rule))(q, k, v)

    def test_block_size_must_fill_tpu_lanes(self):
        with self.assertRaisesRegex(ConfigError, "attention_block_size=96 must be a multiple of 128"):
            rj.ModelConfig(**SMALL, attention_impl="splash", attention_block_size=96)


def _small(impl, **kw):
    return rj.ModelConfig(**{**SMALL, "num_key_value_heads": 2, "num_hidden_layers": 1, **kw},
                          attention_impl=impl, attention_block_size=128)


def test_model_logits_and_gradients_match_xla():
    """A 1-layer GQA model on two packed documents: logits and parameter gradients."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 128)), jnp.int32)
    segment_ids = jnp.asarray([[0] * 50 + [1] * 78, [3] * 128], jnp.int32)
    results = []
    for impl in ("xla", "splash_interpret"):
        model = rj.Olmo2Model(_small(impl), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        @jax.jit
        def loss(params):
            logits = nnx.merge(graphdef, params)(ids, segment_ids=segment_ids)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

        results.append(jax.value_and_grad(loss, has_aux=True)(params))
    (_, want), want_grads = results[0]
    (_, got), got_grads = results[1]
    chex.assert_trees_all_close(got, want, atol=1e-4)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-5)


def test_model_generation_with_splash_is_refused():
    model = rj.Olmo2Model(_small("splash"), rngs=nnx.Rngs(0))
    cache = init_cache(model.config, 1, 8)
    with pytest.raises(ValueError, match="KV-cache prefill or decoding"):
        model.forward(jnp.zeros((1, 3), jnp.int32), cache=cache)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install "jax[tpu]==0.10.2"): '
                           "no XLA:TPU compiler to compile splash for a TPU topology")
def test_compiles_for_a_tpu_topology():
    """Forward and backward of a tiny RePo model with splash, compiled by XLA:TPU for a
    v5p 2x2x1 slice (4 chips, fsdp=2 x tensor=2) on this host; prints per-chip memory."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), topo.devices)
    cfg = rj.ModelConfig(**{**SMALL, "hidden_size": 512, "num_attention_heads": 4,
                            "num_key_value_heads": 4}, dtype="bfloat16",
                         attention_impl="splash").replace(repo_start_layer=2)
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=shd.replicated(mesh)), params)
    ids = jax.ShapeDtypeStruct((4, 512), jnp.int32, sharding=shd.named(mesh, ("batch", "seq"), (4, 512)))

    def loss(params, ids):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            logits = nnx.merge(graphdef, params)(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    compiled = jax.jit(jax.grad(loss)).lower(abstract, ids).compile()
    hlo = compiled.as_text()
    memory = compiled.memory_analysis()
    print(f"v5p:2x2x1 splash fwd+bwd per chip: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
          f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB")
    assert "tpu_custom_call" in hlo  # the Mosaic kernel, not an XLA fallback
    assert memory.temp_size_in_bytes > 0


def test_cli_refuses_a_splash_checkpoint_off_tpu_and_names_the_override(tmp_path, capsys):
    """A model trained with the pod presets saves attention_impl='splash'; generate on a
    CPU host says so in one line, and --attention-impl xla runs it."""
    from repo_jax.cli import run
    from repo_jax.generate import main
    from tests.cli_checkpoints import one_line_error, save_model_dir, tiny_config

    model_dir = save_model_dir(tmp_path / "model", tiny_config().replace(attention_impl="splash"))
    args = ["--checkpoint", str(model_dir), "--prompt", "the sun is", "--max-new-tokens", "2"]
    assert run(main, args) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "attention_impl=splash" in line and "--attention-impl xla" in line
    assert run(main, args + ["--attention-impl", "xla"]) == 0
