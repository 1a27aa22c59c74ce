"""Numerical parity at float32 against upstream `transformers` and against the
independent PyTorch RePo reference (`convert/torch_reference.py`)."""
from __future__ import annotations

import tempfile

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
from repo_jax.hf_format import path_to_hf
from repo_jax.loading import iter_hf_tensors
from tests.conftest import SMALL, add_repo_maps, hf_olmo2, write_hf_dir

TOL = 1e-4


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


class HFParityTest(parameterized.TestCase):
    """Plain OLMo-2, with and without grouped-query attention, jit and no jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("mha", 4), ("gqa", 2), ("mqa", 1))
    def test_logits_match_transformers(self, kv_heads):
        hf = hf_olmo2(num_key_value_heads=kv_heads)
        path = tempfile.mkdtemp()
        hf.save_pretrained(path)
        model = rj.load_model(path)
        ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 24)).astype(np.int32)
        graphdef, state = nnx.split(model)
        fn = self.variant(lambda s, x: nnx.merge(graphdef, s)(x))
        logits = fn(state, jnp.asarray(ids))
        chex.assert_shape(logits, (2, 24, SMALL["vocab_size"]))
        chex.assert_type(logits, jnp.float32)
        err = float(np.abs(np.asarray(logits) - _hf_logits(hf, ids)).max())
        print(f"max |logit diff| vs transformers (kv_heads={kv_heads}): {err:.2e}")
        self.assertLess(err, TOL)


def test_torch_reference_matches_transformers(tmp_path, tokens):
    """The RePo reference reduces to upstream OLMo-2 with no RePo layers."""
    hf = hf_olmo2(num_key_value_heads=2)
    cfg = rj.ModelConfig(**{**SMALL, "num_key_value_heads": 2})
    ref, _ = torch_reference.forward(hf.state_dict(), cfg, torch.from_numpy(tokens).long())
    assert np.abs(ref.numpy() - _hf_logits(hf, tokens)).max() < TOL


def _repo_checkpoint(tmp_path, start: int = 1):
    cfg = rj.ModelConfig(**SMALL).replace(repo_start_layer=start)
    sd = add_repo_maps(dict(hf_olmo2().state_dict()), cfg)
    return write_hf_dir(tmp_path / "repo", sd, cfg), sd, cfg


class RePoParityTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_logits_and_positions_match_reference(self):
        import pathlib
        tmp = pathlib.Path(tempfile.mkdtemp())
        path, sd, cfg = _repo_checkpoint(tmp)
        model = rj.load_model(path)
        self.assertEqual(model.config.repo_layers, (1, 2, 3))
        ids = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (2, 24)).astype(np.int32)
        graphdef, state = nnx.split(model)
        fn = self.variant(lambda s, x: nnx.merge(graphdef, s)(x, return_positions=True))
        logits, positions = fn(state, jnp.asarray(ids))
        ref_logits, ref_pos = torch_reference.forward(sd, cfg, torch.from_numpy(ids).long())
        self.assertEqual(sorted(positions), [1, 2, 3])
        for layer, pos in positions.items():
            chex.assert_shape(pos, (2, cfg.num_attention_heads, 24))
            chex.assert_type(pos, jnp.float32)
            np.testing.assert_allclose(np.asarray(pos), ref_pos[layer].numpy(), atol=1e-4, rtol=1e-4)
        # The maps are random with scale 0.3: positions must really move off the integers.
        spread = min(float(np.std(np.asarray(p))) for p in positions.values())
        self.assertGreater(spread, 0.2)
        err = float(np.abs(np.asarray(logits) - ref_logits.numpy()).max())
        print(f"RePo max |logit diff| vs torch reference: {err:.2e}")
        self.assertLess(err, TOL)


def test_repo_positions_change_logits(tmp_path, tokens):
    """Guard against a silent no-op: with the maps dropped (RoPE everywhere) the
    logits differ from the RePo model's."""
    path, sd, cfg = _repo_checkpoint(tmp_path)
    repo = np.asarray(rj.load_model(path)(jnp.asarray(tokens)))
    rope_ref, _ = torch_reference.forward(sd, rj.ModelConfig(**SMALL), torch.from_numpy(tokens).long())
    assert np.abs(repo - rope_ref.numpy()).max() > 1e-2


@pytest.mark.parametrize("schemes", [
    ("nope",) * 4,                           # NoPE baseline
    ("rope", "nope", "rope", "nope"),        # mixed RoPE/NoPE
    ("rope", "nope", "repo", "repo"),
    ("rope", "repo", "rope", "repo"),        # RePo on an explicit, non-contiguous list
])
@pytest.mark.parametrize("scan", [False, True])
def test_layer_schemes_match_reference(schemes, scan, tokens):
    cfg = rj.ModelConfig(**SMALL, layer_schemes=schemes)
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(3), scan_layers=scan)
    # Spread the RePo positions out so rotation errors are visible.
    for i in cfg.repo_layers:
        attn = model.layers[i].self_attn
        for m in (attn.gate_map, attn.content_map, attn.final_map):
            m.kernel[...] = m.kernel[...] * 10.0
    logits, positions = model(jnp.asarray(tokens), return_positions=True)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in iter_hf_tensors(model)}
    ref, ref_pos = torch_reference.forward(sd, cfg, torch.from_numpy(tokens).long())
    assert sorted(positions) == list(cfg.repo_layers)
    for layer in cfg.repo_layers:
        np.testing.assert_allclose(np.asarray(positions[layer]), ref_pos[layer].numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(logits) - ref.numpy()).max() < TOL


def test_nope_differs_from_rope(tokens):
    rope = rj.Olmo2Model(rj.ModelConfig(**SMALL), rngs=nnx.Rngs(0))
    nope = rj.Olmo2Model(rj.ModelConfig(**SMALL, layer_schemes=("nope",) * 4), rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(rope(tokens)) - np.asarray(nope(tokens))).max() > 1e-3


def test_bfloat16_compute_tracks_float32(tokens):
    cfg = rj.ModelConfig(**SMALL).replace(repo_start_layer=2)
    f32 = rj.Olmo2Model(cfg, rngs=nnx.Rngs(0))
    bf16 = rj.Olmo2Model(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    a, pa = f32(jnp.asarray(tokens), return_positions=True)
    b, pb = bf16(jnp.asarray(tokens), return_positions=True)
    chex.assert_type(b, jnp.float32)  # logits are float32 whatever the compute dtype
    chex.assert_type(pb[2], jnp.float32)
    assert float(jnp.abs(a - b).max()) < 0.1
    assert float(jnp.abs(a - b).max()) > 0.0  # it really computed in bfloat16


@pytest.mark.parametrize("schemes", [("rope", "repo", "repo", "repo"), ("repo", "nope", "rope", "repo")])
def test_gradients_match_reference(schemes, tokens):
    """Every parameter's gradient of a next-token loss, RePo maps included (they are
    reached only through the rotation's angles), against torch autograd on the reference."""
    cfg = rj.ModelConfig(**SMALL, layer_schemes=schemes)
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(4))
    for i in cfg.repo_layers:  # positions spread over several units, as in training
        attn = model.layers[i].self_attn
        for m in (attn.gate_map, attn.content_map, attn.final_map):
            m.kernel[...] = m.kernel[...] * 10.0
    ids = jnp.asarray(tokens)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

    grads = {path_to_hf(path)[0]: (np.asarray(g.get_value()), path_to_hf(path)[1])
             for path, g in nnx.to_flat_state(jax.grad(loss)(params))}
    sd = {k: torch.from_numpy(np.array(v)).requires_grad_() for k, v in iter_hf_tensors(model)}
    logits, _ = torch_reference.forward(sd, cfg, torch.from_numpy(tokens).long(), grad=True)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size),
                                      torch.from_numpy(tokens[:, 1:]).long().reshape(-1)).backward()
    assert sorted(grads) == sorted(sd)
    for name, (g, transposed) in grads.items():
        ref = sd[name].grad.numpy()
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(g.T if transposed else g, ref, atol=TOL * scale, rtol=0, err_msg=name)
    maps = [n for n in grads if "final_map" in n]
    assert len(maps) == len(cfg.repo_layers) and all(np.abs(grads[n][0]).max() > 1e-6 for n in maps)
