"""`python -m convert import/export`: every source layout converts with logit parity
at float32, export round trips are bitwise, and streaming in small blocks gives
the same bytes as large ones."""
from __future__ import annotations

import copy
import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized
from flax import nnx
from safetensors.torch import load_file

import repo_jax as rj
from convert import torch_reference
from convert.__main__ import main
from convert.exporter import export_model
from convert.importer import import_checkpoint
from convert.verify import VerifyError, verify_conversion
from repo_jax import params_io, step_integrity
from repo_jax.hf_format import config_from_hf
from repo_jax.sources import open_source
from tests.conftest import SMALL, add_repo_maps, hf_olmo2, write_hf_dir
from tests.convert_helpers import olmo_state_dict, repo_hf_config, save_bin, save_olmo

TOL = 1e-4
IDS = np.random.default_rng(5).integers(0, SMALL["vocab_size"], (2, 20)).astype(np.int32)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def models():
    """A plain GQA model (upstream transformers) and a RePo model (layers 1-3)."""
    plain = hf_olmo2(num_key_value_heads=2)
    plain_cfg = rj.ModelConfig(**{**SMALL, "num_key_value_heads": 2})
    repo_cfg = rj.ModelConfig(**SMALL).replace(repo_start_layer=1)
    repo_sd = add_repo_maps(dict(hf_olmo2(seed=3).state_dict()), repo_cfg)
    with torch.no_grad():
        plain_logits = plain(torch.from_numpy(IDS).long()).logits.numpy()
    repo_logits = torch_reference.forward(repo_sd, repo_cfg, torch.from_numpy(IDS).long())[0].numpy()
    return dict(plain=plain, plain_cfg=plain_cfg, plain_logits=plain_logits,
                repo_sd=repo_sd, repo_cfg=repo_cfg, repo_logits=repo_logits)


def _write(fmt: str, path, m):
    """Write checkpoint format `fmt`; return (dir, expected source kind, reference logits)."""
    plain_sd = dict(m["plain"].state_dict())
    if fmt == "hf-safetensors":
        m["plain"].save_pretrained(path)
    elif fmt == "hf-safetensors-sharded":
        m["plain"].save_pretrained(path, max_shard_size="100KB")
    elif fmt == "hf-bin":
        save_bin(path, plain_sd, m["plain"].config.to_dict())
    elif fmt == "hf-bin-sharded":
        save_bin(path, plain_sd, m["plain"].config.to_dict(), shards=3)
    elif fmt.startswith("repo-"):
        _, spelling, rope = fmt.split("-")
        write_hf_dir(path, m["repo_sd"], m["repo_cfg"], repo_hf_config(m["repo_cfg"], spelling, rope))
    elif fmt == "olmo-pt":
        save_olmo(path, plain_sd, m["plain_cfg"], "pt")
    elif fmt == "olmo-safetensors-repo":
        save_olmo(path, m["repo_sd"], m["repo_cfg"], "safetensors")
    kind = {"hf-safetensors-sharded": "hf-safetensors", "hf-bin-sharded": "hf-bin",
            "olmo-safetensors-repo": "olmo-safetensors"}.get(fmt, fmt)
    kind = "hf-safetensors" if fmt.startswith("repo-") else kind
    repo = fmt.startswith("repo-") or fmt.endswith("-repo")
    return path, kind, m["repo_logits"] if repo else m["plain_logits"]


FORMATS = ["hf-safetensors", "hf-safetensors-sharded", "hf-bin", "hf-bin-sharded",
           "repo-both-both", "repo-typo-parameters", "repo-correct-top",
           "olmo-pt", "olmo-safetensors-repo"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_every_format_matches_pytorch(fmt, models, tmp_path, capsys):
    src, kind, reference = _write(fmt, tmp_path / "src", models)
    dst = tmp_path / "dst"
    assert main(["import", str(src), str(dst)]) == 0
    assert "imported" in capsys.readouterr().out
    cfg, meta = params_io.read_meta(dst)
    assert meta["source_format"] == kind and meta["dtype"] == "float32"
    want_repo = [1, 2, 3] if "repo" in fmt else []
    assert list(cfg.repo_layers) == meta["repo_layers"] == want_repo
    converted = np.asarray(rj.load_model(dst)(jnp.asarray(IDS)))
    err = float(np.abs(converted - reference).max())
    print(f"{fmt}: max |logit diff| vs PyTorch {err:.2e}")
    assert err < TOL
    # load_model reads the source directly too, with the same result.
    direct = np.asarray(rj.load_model(src)(jnp.asarray(IDS)))
    np.testing.assert_allclose(direct, converted, atol=1e-6, rtol=0)


def test_olmo_reference_reads_olmo_names(models):
    """forward_olmo (used by --verify on OLMo checkpoints) equals the HF-named forward."""
    sd, cfg = models["repo_sd"], models["repo_cfg"]
    ids = torch.from_numpy(IDS).long()
    a = torch_reference.forward_olmo(olmo_state_dict(sd, cfg), cfg, ids)[0]
    assert torch.equal(a, torch_reference.forward(sd, cfg, ids)[0])


@pytest.mark.parametrize("fmt", ["hf-bin-sharded", "repo-both-both", "olmo-safetensors-repo"])
def test_verify_reports_parity(fmt, models, tmp_path, capsys):
    src, _, _ = _write(fmt, tmp_path / "src", models)
    assert main(["import", str(src), str(tmp_path / "dst"), "--verify"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("verify:"))
    assert line.endswith("OK")
    max_abs = float(line.split("max |logit diff| ")[1].split(",")[0])
    assert max_abs < TOL


def test_verify_bfloat16_rounds_the_reference(models, tmp_path):
    src, _, _ = _write("repo-both-both", tmp_path / "src", models)
    result = import_checkpoint(src, tmp_path / "dst", "bfloat16", verify=True, log=_quiet)
    assert result["dtype"] == "bfloat16" and result["verify"]["max_abs_diff"] < TOL
    reader = params_io.ParamsReader(tmp_path / "dst")
    assert {reader.dtype(k).name for k in reader.keys()} == {"bfloat16"}


def test_verify_catches_a_wrong_model(models, tmp_path):
    """The check can fail: a model converted from other weights is refused."""
    a, _, _ = _write("hf-safetensors", tmp_path / "a", models)
    other = hf_olmo2(num_key_value_heads=2, seed=9)
    other.save_pretrained(tmp_path / "b")
    import_checkpoint(tmp_path / "b", tmp_path / "b_rj", log=_quiet)
    with pytest.raises(VerifyError, match="verification failed"):
        verify_conversion(open_source(a), tmp_path / "b_rj", log=_quiet)


def test_failed_verify_leaves_nothing(models, tmp_path, monkeypatch, capsys):
    import convert.verify as verify

    src, _, _ = _write("hf-safetensors", tmp_path / "src", models)
    capsys.readouterr()
    real = verify.torch_logits
    monkeypatch.setattr(verify, "torch_logits",
                        lambda *a: (real(*a)[0] + 0.01, "perturbed reference"))
    assert main(["import", str(src), str(tmp_path / "dst"), "--verify"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: verification failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("fmt", ["hf-safetensors-sharded", "olmo-pt"])
def test_small_blocks_write_the_same_bytes(fmt, models, tmp_path):
    """Streaming in 4 KiB blocks (many per tensor, fused tensors split across them)
    gives exactly what one block per tensor gives, on import and on export."""
    src, _, _ = _write(fmt, tmp_path / "src", models)
    import_checkpoint(src, tmp_path / "big", log=_quiet, block_bytes=1 << 30)
    import_checkpoint(src, tmp_path / "small", log=_quiet, block_bytes=4096)
    big, small = params_io.ParamsReader(tmp_path / "big"), params_io.ParamsReader(tmp_path / "small")
    assert big.keys() == small.keys()
    q = "layers.0.self_attn.q_proj.kernel"
    assert small.chunk_rows(q, 1) < small.shape(q)[1]  # really written in several chunks
    for k in big.keys():
        np.testing.assert_array_equal(big.read(k), small.read(k))
    export_model(tmp_path / "small", tmp_path / "hf_big", log=_quiet, block_bytes=1 << 30)
    export_model(tmp_path / "small", tmp_path / "hf_small", log=_quiet, block_bytes=4096)
    assert ((tmp_path / "hf_big/model.safetensors").read_bytes()
            == (tmp_path / "hf_small/model.safetensors").read_bytes())


def _hf_tensors(directory) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise_and_loads_in_transformers(dtype, models, tmp_path, capsys):
    from transformers import Olmo2ForCausalLM

    copy.deepcopy(models["plain"]).to(getattr(torch, dtype)).save_pretrained(tmp_path / "src")
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "rj")]) == 0
    assert params_io.read_meta(tmp_path / "rj")[1]["dtype"] == dtype  # kept by default
    assert main(["export", str(tmp_path / "rj"), str(tmp_path / "out"), "--shard-size", "150KB"]) == 0
    assert (tmp_path / "out/model.safetensors.index.json").exists()
    before, after = _hf_tensors(tmp_path / "src"), _hf_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name in before:
        assert after[name].dtype == getattr(torch, dtype)
        assert torch.equal(before[name], after[name]), name
    exported = Olmo2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                attn_implementation="eager").eval()
    with torch.no_grad():
        logits = exported(torch.from_numpy(IDS).long()).logits.numpy()
    jax_logits = np.asarray(rj.load_model(tmp_path / "rj", dtype="float32")(jnp.asarray(IDS)))
    assert np.abs(logits - jax_logits).max() < TOL
    if dtype == "float32":
        np.testing.assert_array_equal(logits, models["plain_logits"])


def test_repo_export_for_the_authors_loaders(models, tmp_path):
    src, _, _ = _write("repo-typo-parameters", tmp_path / "src", models)
    import_checkpoint(src, tmp_path / "rj", log=_quiet)
    export_model(tmp_path / "rj", tmp_path / "out", log=_quiet)
    hf = json.loads((tmp_path / "out/config.json").read_text())
    pe = hf["pe_config"]
    assert pe["dynamic_pe_mode"] == "swigluex_multihead"
    assert pe["dynamic_pe_start_layer"] == pe["dynmaic_pe_start_layer"] == 1
    assert pe["dynamic_pe_layer_ids"] == pe["dynmaic_pe_layer_ids"] == ""
    sd = _hf_tensors(tmp_path / "out")
    for name, t in models["repo_sd"].items():
        assert torch.equal(sd[name], t), name
    cfg = config_from_hf(hf)
    logits, _ = torch_reference.forward(sd, cfg, torch.from_numpy(IDS).long())
    np.testing.assert_array_equal(logits.numpy(), models["repo_logits"])


def test_olmo_import_exports_to_transformers(models, tmp_path):
    from transformers import Olmo2ForCausalLM

    src, _, _ = _write("olmo-pt", tmp_path / "src", models)
    import_checkpoint(src, tmp_path / "rj", log=_quiet)
    export_model(tmp_path / "rj", tmp_path / "out", log=_quiet)
    exported = Olmo2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                attn_implementation="eager").eval()
    with torch.no_grad():
        logits = exported(torch.from_numpy(IDS).long()).logits.numpy()
    np.testing.assert_array_equal(logits, models["plain_logits"])


class RunDirExportTest(parameterized.TestCase):
    """Export from a training run directory picks the latest step (written by Orbax's
    own StandardCheckpointer, as training does) and matches it, with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_latest_step(self):
        import tempfile
        from pathlib import Path

        from transformers import Olmo2ForCausalLM

        tmp = Path(tempfile.mkdtemp())
        for step, seed in ((5, 0), (12, 4)):
            hf_olmo2(num_key_value_heads=2, seed=seed).save_pretrained(tmp / f"hf{step}")
            model = rj.load_model(tmp / f"hf{step}")
            d = tmp / "run" / "checkpoints" / str(step)
            params_io.save_params(d, params_io.flat_params(model))
            params_io.write_meta(d, model.config, {"step": step})
            step_integrity.write_manifest(d)  # what makes a finished training step
        result = export_model(tmp / "run", tmp / "out", log=_quiet)
        self.assertEqual(Path(result["model_dir"]).name, "12")
        exported = Olmo2ForCausalLM.from_pretrained(tmp / "out", dtype=torch.float32,
                                                attn_implementation="eager").eval()
        with torch.no_grad():
            logits = exported(torch.from_numpy(IDS).long()).logits.numpy()
        graphdef, state = nnx.split(model)
        fn = self.variant(lambda s, x: nnx.merge(graphdef, s)(x))
        jax_logits = np.asarray(fn(state, jnp.asarray(IDS)))
        chex.assert_shape(jax_logits, (*IDS.shape, SMALL["vocab_size"]))
        self.assertLess(float(np.abs(logits - jax_logits).max()), TOL)


def test_streamed_params_restore_sharded(models, tmp_path):
    """What ParamsWriter streams is an Orbax checkpoint: restore_params reads it onto
    8 devices with a sharding per parameter, as training does."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    src, _, _ = _write("hf-safetensors", tmp_path / "src", models)
    import_checkpoint(src, tmp_path / "rj", log=_quiet, block_bytes=4096)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))
    flat = params_io.flat_params(rj.abstract_model(params_io.read_meta(tmp_path / "rj")[0]))
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
        mesh, PartitionSpec("x") if v.shape[0] % 8 == 0 else PartitionSpec()))
        for k, v in flat.items()}
    restored = params_io.restore_params(tmp_path / "rj", target)
    reader = params_io.ParamsReader(tmp_path / "rj")
    emb = restored["embed_tokens.embedding"]
    assert len(emb.sharding.device_set) == 8 and emb.addressable_shards[0].data.shape == (32, 64)
    for k, v in restored.items():
        np.testing.assert_array_equal(np.asarray(v), reader.read(k))
    np.testing.assert_array_equal(np.asarray(emb), models["plain"].state_dict()[
        "model.embed_tokens.weight"].numpy())
