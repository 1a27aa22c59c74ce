"""Model behaviour beyond parity: configs, presets, masks, cache, scan, loading errors."""
from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import repo_jax as rj
from repo_jax.hf_format import config_to_hf
from repo_jax.model import init_cache
from tests.conftest import SMALL, add_repo_maps, hf_olmo2, write_hf_dir


# ---- presets and parameter counts -------------------------------------------------
def test_olmo2_1b_parameter_counts():
    plain = rj.param_count(rj.ModelConfig.preset("olmo2-1b"))
    repo = rj.param_count(rj.ModelConfig.preset("olmo2-1b-repo"))
    assert plain == 1_484_916_736
    assert repo - plain == 11_579_392


@pytest.mark.parametrize("name,start,layers,d", [
    ("olmo2-1b-repo", 5, 16, 2048), ("olmo2-7b-repo", 10, 32, 4096),
    ("olmo2-13b-repo", 13, 40, 5120), ("tiny-repo", 1, 4, 128)])
def test_repo_presets(name, start, layers, d):
    cfg = rj.ModelConfig.preset(name)
    assert cfg.repo_start_layer == start
    assert cfg.layer_schemes == ("rope",) * start + ("repo",) * (layers - start)
    base = rj.ModelConfig.preset(name.removesuffix("-repo"))
    h = cfg.num_attention_heads
    per_layer = 2 * d * (d // 8) + (d // 8) * h
    assert rj.param_count(cfg) - rj.param_count(base) == (layers - start) * per_layer


# ---- validation ----------------------------------------------------------------------
@pytest.mark.parametrize("fields,needle", [
    (dict(num_attention_heads=5), "num_attention_heads=5 does not divide hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(layer_schemes=("rope", "alibi", "rope", "rope")), "layer_schemes[1]='alibi'"),
    (dict(layer_schemes=("rope",) * 3), "layer_schemes has 3 entries"),
    (dict(num_key_value_heads=2, layer_schemes=("rope", "repo", "repo", "repo")),
     "RePo assigns positions per query head"),
    (dict(dtype="float8"), "dtype='float8'"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(rope_scaling_factor=0.5), "rope_scaling_factor=0.5"),
    (dict(vocab_size=0), "vocab_size=0"),
])
def test_config_errors_name_the_field(fields, needle):
    with pytest.raises(rj.ConfigError) as e:
        rj.ModelConfig(**{**SMALL, **fields})
    assert needle in str(e.value)


def test_start_layer_outside_model():
    with pytest.raises(rj.ConfigError, match="repo_start_layer=4 is outside"):
        rj.ModelConfig(**SMALL).replace(repo_start_layer=4)
    with pytest.raises(rj.ConfigError, match="unknown model preset"):
        rj.ModelConfig.preset("olmo3-1b")
    with pytest.raises(rj.ConfigError, match=r"unknown model config key\(s\) \['hidden'\]"):
        rj.ModelConfig.from_dict({"hidden": 3})


def test_from_dict_start_layer_and_round_trip():
    cfg = rj.ModelConfig.from_dict({**SMALL, "repo_start_layer": 2, "base_scheme": "nope"})
    assert cfg.layer_schemes == ("nope", "nope", "repo", "repo")
    assert rj.ModelConfig.from_dict(cfg.to_dict()) == cfg


# ---- masks, packing, cache, scan ------------------------------------------------------
def _repo_model(seed=0, **kw):
    cfg = rj.ModelConfig(**{**SMALL, **kw}).replace(repo_start_layer=2)
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(seed))
    for i in cfg.repo_layers:  # spread positions so errors show
        a = model.layers[i].self_attn
        a.final_map.kernel[...] = a.final_map.kernel[...] * 50.0
    return model


class ForwardTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_packed_documents_equal_separate_forwards(self):
        model = _repo_model()
        graphdef, state = nnx.split(model)
        rng = np.random.default_rng(0)
        a, b = rng.integers(0, 256, (1, 10)), rng.integers(0, 256, (1, 14))
        packed = np.concatenate([a, b], 1).astype(np.int32)
        seg = np.array([[1] * 10 + [2] * 14], np.int32)
        pos = np.array([list(range(10)) + list(range(14))], np.int32)
        fn = self.variant(lambda s, ids, seg, pos: nnx.merge(graphdef, s).forward(
            ids, segment_ids=seg, position_ids=pos))
        out = fn(state, packed, seg, pos)
        la = model(jnp.asarray(a, jnp.int32))
        lb = model(jnp.asarray(b, jnp.int32))
        np.testing.assert_allclose(out.logits[:, :10], la, atol=1e-4)
        np.testing.assert_allclose(out.logits[:, 10:], lb, atol=1e-4)
        chex.assert_shape(out.positions[2], (1, 4, 24))

    @chex.variants(with_jit=True, without_jit=True)
    def test_cache_in_chunks_equals_full_forward(self):
        model = _repo_model()
        graphdef, state = nnx.split(model)
        ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
        full, full_pos = model(ids, return_positions=True)
        fwd = self.variant(lambda s, x, c: nnx.merge(graphdef, s).forward(x, cache=c))
        cache = init_cache(model.config, batch=2, max_len=16)
        out1 = fwd(state, ids[:, :7], cache)
        out2 = fwd(state, ids[:, 7:8], out1.cache)
        out3 = fwd(state, ids[:, 8:], out2.cache)
        self.assertEqual(int(out3.cache.end), 12)
        got = jnp.concatenate([out1.logits, out2.logits, out3.logits], 1)
        np.testing.assert_allclose(got, full, atol=1e-4)
        pos = jnp.concatenate([o.positions[3] for o in (out1, out2, out3)], 2)
        np.testing.assert_allclose(pos, full_pos[3], atol=1e-4, rtol=1e-5)

    def test_left_padding_matches_unpadded(self):
        model = _repo_model()
        ids = np.random.default_rng(2).integers(0, 256, (1, 9)).astype(np.int32)
        padded = np.concatenate([np.zeros((1, 3), np.int32), ids], 1)
        mask = np.array([[0] * 3 + [1] * 9])
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        out = model(jnp.asarray(padded), attention_mask=mask, position_ids=pos)
        np.testing.assert_allclose(out[:, 3:], model(jnp.asarray(ids)), atol=1e-4)

    def test_scan_layers_same_logits_and_gradients(self):
        cfg = rj.ModelConfig(**SMALL, layer_schemes=("rope", "nope", "repo", "repo"))
        plain = rj.Olmo2Model(cfg, rngs=nnx.Rngs(0))
        scanned = rj.Olmo2Model(cfg, rngs=nnx.Rngs(0), scan_layers=True)
        ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 8)), jnp.int32)

        def loss(m):
            return jnp.mean(m(ids) ** 2)
        ga = nnx.grad(loss)(plain)
        gb = nnx.grad(loss)(scanned)
        chex.assert_trees_all_close(nnx.state(ga), nnx.state(gb), atol=1e-6)

    @parameterized.parameters("full", "dots")
    def test_remat_same_gradients(self, policy):
        cfg = rj.ModelConfig(**SMALL).replace(repo_start_layer=1)
        ids = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 8)), jnp.int32)

        def grads(c):
            return nnx.state(nnx.grad(lambda m: jnp.mean(m(ids) ** 2))(rj.Olmo2Model(c, rngs=nnx.Rngs(0))))
        chex.assert_trees_all_close(grads(cfg), grads(cfg.replace(remat=policy)), atol=1e-6)


def test_repo_positioner_reads_x_in_one_product():
    """gate_map and content_map run as one [d, 2r] dot in the forward and in the
    backward (input and weight gradients), with the parameters kept apart; positions
    equal the two separate maps'."""
    model = _repo_model()
    attn = model.layers[2].self_attn
    cfg = model.config
    d, r = cfg.hidden_size, cfg.repo_hidden_size
    x = jax.random.normal(jax.random.key(0), (2, 8, d))
    separate = attn.final_map(jax.nn.silu(attn.gate_map(x)) * attn.content_map(x))
    np.testing.assert_allclose(attn.repo_positions(x), separate, rtol=1e-5, atol=1e-5)

    graphdef, state = nnx.split(attn)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state).repo_positions(x) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile().as_text()
    shapes = [line.split(" dot(")[0].split(" = ")[1].split("{")[0] for line in hlo.splitlines() if " dot(" in line]
    assert shapes.count(f"f32[16,{2 * r}]") == 1, shapes  # the product
    assert shapes.count(f"f32[16,{d}]") == 1, shapes  # x's gradient
    assert shapes.count(f"f32[{d},{2 * r}]") == 1 and f"f32[{d},{r}]" not in shapes, shapes  # weights'


def test_rejects_wrong_rank():
    model = rj.Olmo2Model(rj.ModelConfig(**SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(AssertionError):
        model(jnp.zeros((8,), jnp.int32))


# ---- loading ------------------------------------------------------------------------
def _repo_dir(tmp_path, mutate=None):
    cfg = rj.ModelConfig(**SMALL).replace(repo_start_layer=1)
    sd = add_repo_maps(dict(hf_olmo2().state_dict()), cfg)
    hf = config_to_hf(cfg)
    if mutate:
        mutate(sd, hf)
    return write_hf_dir(tmp_path / "ckpt", sd, cfg, hf)


def test_load_accepts_either_start_layer_spelling_and_rope_parameters(tmp_path):
    def only_typo(sd, hf):
        del hf["pe_config"]["dynamic_pe_start_layer"], hf["pe_config"]["dynamic_pe_layer_ids"]
        del hf["rope_theta"]  # transformers 5 writes rope_parameters only
    model = rj.load_model(_repo_dir(tmp_path, only_typo))
    assert model.config.repo_layers == (1, 2, 3)
    assert model.config.rope_theta == 500000.0


@pytest.mark.parametrize("mutate,needle", [
    (lambda sd, hf: hf["pe_config"].update(dynamic_pe_start_layer=2, dynmaic_pe_start_layer=2),
     "gives RePo on layers [2, 3] as the authors' code reads it"),
    (lambda sd, hf: hf.pop("pe_config"), "has no pe_config"),
    (lambda sd, hf: hf.update(model_type="llama"), "model_type='llama' is not supported"),
    (lambda sd, hf: sd.pop("model.layers.2.mlp.up_proj.weight"),
     "missing tensor(s) ['model.layers.2.mlp.up_proj.weight']"),
    (lambda sd, hf: sd.update({"model.layers.0.self_attn.q_proj.bias": sd["model.norm.weight"].clone()}),
     "model.layers.0.self_attn.q_proj.bias"),
    (lambda sd, hf: sd.update({"model.norm.weight": sd["model.norm.weight"][:10]}),
     "tensor 'model.norm.weight' has shape (10,), expected (64,)"),
    (lambda sd, hf: sd.update({"model.layers.1.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"].clone().fill_(float("nan"))}),
     "'model.layers.1.mlp.up_proj.weight' contains NaN"),
])
def test_load_refuses_bad_checkpoints(tmp_path, mutate, needle):
    with pytest.raises(rj.FormatError) as e:
        rj.load_model(_repo_dir(tmp_path, mutate))
    assert needle in str(e.value)


def test_load_sharded_safetensors(tmp_path, tokens):
    hf = hf_olmo2()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 1
    import torch
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(np.asarray(rj.load_model(tmp_path)(jnp.asarray(tokens))) - want).max() < 1e-4


def test_truncated_safetensors_is_refused(tmp_path):
    path = _repo_dir(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(rj.FormatError, match="truncated"):
        rj.load_model(path)


def test_load_bfloat16(tmp_path, tokens):
    model = rj.load_model(_repo_dir(tmp_path), dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert model(jnp.asarray(tokens)).dtype == jnp.float32


def test_model_directory_round_trip(tmp_path, tokens):
    from repo_jax import params_io
    model = _repo_model()
    params_io.save_params(tmp_path, params_io.flat_params(model))
    params_io.write_meta(tmp_path, model.config, {"source": "test"})
    loaded = rj.load_model(tmp_path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))))
    with pytest.raises(rj.FormatError, match="parameters do not match the model"):
        params_io.load_model_dir(tmp_path, layer_schemes=("rope",) * 4)


def test_run_directory_resolves_to_latest_step(tmp_path, tokens):
    from repo_jax import params_io, step_integrity
    model = _repo_model()
    for step in (5, 20):
        d = tmp_path / "checkpoints" / str(step)
        d.mkdir(parents=True)
        params_io.save_params(d, params_io.flat_params(model))
        params_io.write_meta(d, model.config, {"step": step})
        step_integrity.write_manifest(d)
    (tmp_path / "checkpoints" / "30").mkdir()  # unfinished: no checksums
    assert params_io.resolve_model_dir(tmp_path) == tmp_path / "checkpoints" / "20"
    assert rj.load_model(tmp_path).config == model.config
