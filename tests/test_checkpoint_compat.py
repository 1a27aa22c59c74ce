"""Checkpoints in the layouts the authors' code (SakanaAI/repo: its transformers 4.52
fork and its OLMo fork) and AllenAI's OLMo write, read as those tools read them.

The config files are written as those tools write them: `pe_config` as the authors'
converter (both spellings equal) or their `PEConfig` (the correct spelling always,
with its defaults, next to the misspelled keys a user set), OLMo's `config.yaml` as
AllenAI writes its published configs (`layer_norm_eps: 1e-6`) or as the authors' OLMo
fork adds `dynamic_pe_*` keys. Each loads with logit parity against PyTorch:
upstream transformers for the plain model, the independent convert/torch_reference.py
(given the per-layer schemes the authors' code builds, written out here) otherwise.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from absl.testing import parameterized
from flax import nnx

import repo_jax as rj
from convert import torch_reference
from convert.__main__ import main
from convert.exporter import export_model
from convert.importer import import_checkpoint
from repo_jax import olmo_format
from repo_jax.hf_format import config_from_hf
from repo_jax.pe_config import PeConfigWarning
from tests.cli_checkpoints import save_model_dir
from tests.conftest import SMALL, add_repo_maps, hf_olmo2, write_hf_dir
from tests.convert_helpers import save_olmo

TOL = 1e-4
IDS = np.random.default_rng(9).integers(0, SMALL["vocab_size"], (2, 20)).astype(np.int32)
REPO = "swigluex_multihead"


def _quiet(*_):
    pass


# ---- config files as the tools write them --------------------------------------------
def converter_pe(mode: str, start: int = 0, ids: str = "") -> dict:
    """pe_config as the authors' OLMo -> HF converter writes it: both spellings equal."""
    return {"dynamic_pe_mode": mode, "dynmaic_pe_start_layer": start,
            "dynamic_pe_start_layer": start, "dynamic_pe_layer_ids": ids,
            "dynmaic_pe_layer_ids": ids}


def peconfig_pe(mode: str, **set_keys) -> dict:
    """pe_config as the authors' `PEConfig` saves it: its correctly spelled fields with
    their defaults, plus the keys a user set (misspelled ones included)."""
    return {"dynamic_pe_mode": mode, "dynamic_pe_start_layer": 0, "dynamic_pe_layer_ids": "",
            "dynamic_pe_init_pdrop": 1.0, "dynamic_pe_dropout_anneal_step": 0, **set_keys}


def allenai_yaml(extra: str = "") -> str:
    """A config.yaml in the style of allenai/OLMo configs/official-0425/OLMo2-1B-stage1.yaml
    (tiny sizes; `1e-6`, `1e-5`, `1e-8`, `5e12` written as AllenAI writes them), with
    `extra` lines added to `model:` (the authors' fork adds dynamic_pe_* there)."""
    return f"""run_name: OLMo2-tiny-stage1
seed: 6198
dry_run: false

wandb:
  name: ${{run_name}}
  project: olmo-small

model:
  d_model: {SMALL['hidden_size']}
  n_heads: {SMALL['num_attention_heads']}
  n_layers: {SMALL['num_hidden_layers']}
  mlp_ratio: 3
  weight_tying: false
  alibi: false
  rope: true
  rope_theta: 500000
  flash_attention: true
  attention_dropout: 0.0
  include_bias: false
  block_type: sequential
  layer_norm_type: rms
  layer_norm_with_affine: true
  layer_norm_eps: 1e-6
  bias_for_layer_norm: false
  attention_layer_norm: true
  attention_layer_norm_with_affine: true
  norm_after: true
  activation_type: swiglu
  residual_dropout: 0.0
  embedding_dropout: 0.0
  max_sequence_length: 4096
  vocab_size: {SMALL['vocab_size'] - 10}
  embedding_size: {SMALL['vocab_size']}
  eos_token_id: 1
  pad_token_id: 0
  init_device: meta
  init_fn: normal
  init_std: 0.02
  init_cutoff_factor: 3
{extra}
softmax_auxiliary_loss: true
auxiliary_loss_multiplier: 1e-5
fused_loss: true

optimizer:
  name: adamw
  learning_rate: 4.0e-4
  eps: 1e-8
  betas:
  - 0.9
  - 0.95

scheduler:
  name: cosine_with_warmup
  t_max: 5e12
"""


def schemes(repo=(), nope=()) -> tuple[str, ...]:
    return tuple("repo" if i in repo else "nope" if i in nope else "rope"
                 for i in range(SMALL["num_hidden_layers"]))


# name -> (layout, config, layers whose RePo maps the weights hold, schemes the
# authors' code builds, whether loading warns)
CASES = {
    # 1. every plain model the authors' code saves carries dynamic_pe_mode 'none'
    "1 plain (pe_config mode none)": ("hf", converter_pe("none"), (), schemes(), False),
    # 2. their NoPE baseline, all layers and interleaved (their NOPE-n2r1-style runs)
    "2 nope, all layers": ("hf", converter_pe("nope"), (), schemes(nope=range(4)), False),
    "2 nope, ids '1,3'": ("hf", converter_pe("nope", 0, "1,3"), (), schemes(nope=(1, 3)), False),
    # 3. ids below the start layer are dropped: "0,1,3" from 1 is [1, 3]
    "3 ids '0,1,3' start 1": ("hf", converter_pe(REPO, 1, "0,1,3"), (1, 3), schemes(repo=(1, 3)),
                              False),
    # 4. spellings disagree: only the misspelled key set (their code: layers 2-3) ...
    "4 typo start 2, correct 0": ("hf", peconfig_pe(REPO, dynmaic_pe_start_layer=2), (2, 3),
                                  schemes(repo=(2, 3)), False),
    # ... only the correct one set (their code ignores it: RePo, and maps, on every layer)
    "4 correct start 2 only": ("hf", peconfig_pe(REPO, dynamic_pe_start_layer=2), range(4),
                               schemes(repo=range(4)), False),
    # ... and weights that follow the spelling their code ignores: load, warn once
    "4 weights follow correct spelling": ("hf", peconfig_pe(REPO, dynamic_pe_start_layer=2),
                                          (2, 3), schemes(repo=(2, 3)), True),
    # 5. AllenAI's config.yaml (YAML 1.2 floats), and the authors' OLMo fork's keys
    "5 AllenAI config.yaml": ("olmo-pt", allenai_yaml(), (), schemes(), False),
    "5 OLMo fork nope": ("olmo-safetensors", allenai_yaml(
        "  dynamic_pe_mode: 'nope'\n  dynamic_pe_start_layer: 0\n"), (), schemes(nope=range(4)),
        False),
    "5 OLMo fork ids '0,1,3' start 1": ("olmo-pt", allenai_yaml(
        f"  dynamic_pe_mode: {REPO}\n  dynamic_pe_start_layer: 1\n"
        "  dynamic_pe_layer_ids: '0,1,3'\n"),
        (1, 3), schemes(repo=(1, 3)), False),
}


@pytest.fixture(scope="module")
def plain():
    """Upstream transformers OLMo-2 (float32, random norms), its state dict and logits."""
    model = hf_olmo2(seed=4)
    with torch.no_grad():
        logits = model(torch.from_numpy(IDS).long()).logits.numpy()
    return dict(model=model, sd=dict(model.state_dict()), logits=logits)


def reference_config(layer_schemes) -> rj.ModelConfig:
    """What torch_reference needs to know, with the schemes written out by the test."""
    return rj.ModelConfig(**SMALL, rope_theta=500000.0, rms_norm_eps=1e-6,
                          layer_schemes=tuple(layer_schemes))


def write_case(name: str, path, plain) -> tuple[dict, np.ndarray]:
    """Write case `name` at `path`; return its state dict and reference logits."""
    layout, config, maps, want, _ = CASES[name]
    sd = add_repo_maps(dict(plain["sd"]), reference_config(schemes(repo=maps)))
    if layout == "hf":
        write_hf_dir(path, sd, None, {**plain["model"].config.to_dict(), "pe_config": config})
    else:
        save_olmo(path, sd, reference_config(()), layout.removeprefix("olmo-"))
        (path / "config.yaml").write_text(config)
    if set(want) == {"rope"}:
        return sd, plain["logits"]  # upstream transformers
    ref = torch_reference.forward(sd, reference_config(want), torch.from_numpy(IDS).long())[0]
    return sd, ref.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_loads_with_the_authors_reading(name, plain, tmp_path):
    _, _, _, want, warns = CASES[name]
    sd, reference = write_case(name, tmp_path / "ckpt", plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = rj.load_model(tmp_path / "ckpt", dtype="float32")
    ours = [w for w in caught if issubclass(w.category, PeConfigWarning)]
    assert len(ours) == (1 if warns else 0), [str(w.message) for w in ours]
    assert model.config.layer_schemes == want
    assert model.config.rms_norm_eps == 1e-6
    err = float(np.abs(np.asarray(model(jnp.asarray(IDS))) - reference).max())
    print(f"case {name}: max |logit diff| {err:.2e}")
    assert err < TOL
    # The schemes matter: the same weights read as plain RoPE give other logits.
    if set(want) != {"rope"}:
        plain_ref = torch_reference.forward(sd, reference_config(schemes()),
                                            torch.from_numpy(IDS).long())[0].numpy()
        assert np.abs(plain_ref - reference).max() > 1e-3


class NopeJitTest(parameterized.TestCase):
    """The authors' NoPE baseline, run jitted and not (the loaded model is the same)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_nope_baseline_parity(self):
        model = hf_olmo2(seed=4)
        sd = dict(model.state_dict())
        with tempfile.TemporaryDirectory() as d:
            write_hf_dir(Path(d), sd, None, {**model.config.to_dict(),
                                             "pe_config": converter_pe("nope", 0, "1,3")})
            loaded = rj.load_model(d)
        graphdef, state = nnx.split(loaded)
        run = self.variant(lambda s, x: nnx.merge(graphdef, s)(x))
        logits = run(state, jnp.asarray(IDS))
        chex.assert_shape(logits, (*IDS.shape, SMALL["vocab_size"]))
        ref = torch_reference.forward(sd, reference_config(schemes(nope=(1, 3))),
                                      torch.from_numpy(IDS).long())[0].numpy()
        assert float(np.abs(np.asarray(logits) - ref).max()) < TOL


# ---- the command line ------------------------------------------------------------------
def test_convert_import_plain_nope_and_warned(plain, tmp_path, capsys):
    """`convert import --verify` takes the plain 'none' and the NoPE checkpoints
    silently (NoPE verified against torch_reference, not RoPE-only transformers), and
    the warned one with a single `warning:` line naming both readings."""
    for name in ("1 plain (pe_config mode none)", "2 nope, ids '1,3'"):
        write_case(name, tmp_path / name, plain)
        assert main(["import", str(tmp_path / name), str(tmp_path / f"{name} rj"), "--verify"]) == 0
        out = capsys.readouterr()
        assert out.err == "" and out.out.splitlines()[-1].endswith("OK"), out
    write_case("4 weights follow correct spelling", tmp_path / "warn", plain)
    assert main(["import", str(tmp_path / "warn"), str(tmp_path / "warn_rj"), "--verify"]) == 0
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), out.err
    for fragment in ("RePo maps on layers [2, 3]", "pe_config.dynamic_pe_start_layer=2",
                     "no dynmaic_pe_* keys", "would put RePo on layers [0, 1, 2, 3]"):
        assert fragment in lines[0], lines[0]
    verify = next(s for s in out.out.splitlines() if s.startswith("verify:"))
    assert verify.endswith("OK")
    assert rj.load_model(tmp_path / "warn_rj").config.repo_layers == (2, 3)


def test_convert_import_refuses_when_no_reading_matches(plain, tmp_path, capsys):
    """Weights on [1, 2, 3]; the authors' reading gives [2, 3], the other spelling
    [0, 1, 2, 3]: one error line listing each reading and the weights' layers."""
    sd = add_repo_maps(dict(plain["sd"]), reference_config(schemes(repo=(1, 2, 3))))
    pe = peconfig_pe(REPO, dynmaic_pe_start_layer=2)
    write_hf_dir(tmp_path / "src", sd, None, {**plain["model"].config.to_dict(), "pe_config": pe})
    capsys.readouterr()
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in ("RePo on layers [2, 3] as the authors' code reads it "
                     "(pe_config.dynmaic_pe_start_layer=2)",
                     "on layers [0, 1, 2, 3] with the other spelling "
                     "(pe_config.dynamic_pe_start_layer=0, pe_config.dynamic_pe_layer_ids='')",
                     "the weights have RePo maps on layers [1, 2, 3]"):
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "dst").exists()


# ---- the reading rules, config only ------------------------------------------------------
HF = {"model_type": "olmo2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 4, "num_attention_heads": 4, "rope_theta": 500000.0}


def _hf_schemes(pe, weights=None):
    return config_from_hf({**HF, "pe_config": pe}, weight_repo_layers=weights).layer_schemes


def test_reading_rules():
    assert _hf_schemes(None) == _hf_schemes({}) == schemes()
    assert _hf_schemes(converter_pe("none", 2, "1,3")) == schemes()
    assert _hf_schemes(converter_pe(REPO, 1, " 0, 1 ,3")) == schemes(repo=(1, 3))
    assert _hf_schemes(converter_pe(REPO, 2, [0, 3])) == schemes(repo=(3,))
    assert _hf_schemes(converter_pe(REPO, 1, "1,3,9")) == schemes(repo=(1, 3))  # 9: no layer
    assert _hf_schemes(converter_pe("nope", 2)) == schemes(nope=(2, 3))
    # the misspelled keys alone decide without weights; the correct ones are ignored
    assert _hf_schemes({"dynamic_pe_mode": REPO, "dynamic_pe_start_layer": 3}) == schemes(
        repo=range(4))


def test_nope_spellings_disagreeing_follow_the_authors_code_with_a_warning():
    with pytest.warns(PeConfigWarning, match=r"on layers \[2, 3\] as the authors' code reads it"):
        got = _hf_schemes(peconfig_pe("nope", dynmaic_pe_start_layer=2), ())
    assert got == schemes(nope=(2, 3))


@pytest.mark.parametrize("pe,weights,fragments", [
    (converter_pe("none"), (1, 2, 3), ["weights have RePo maps on layers [1, 2, 3]",
                                       "pe_config.dynamic_pe_mode='none'"]),
    (None, (2, 3), ["has no pe_config", "reads as no RePo layers"]),
    (converter_pe("nope"), (3,), ["pe_config.dynamic_pe_mode='nope'"]),
    (converter_pe(REPO, 1, "0,1,3"), (0, 1, 3), ["RePo on layers [1, 3] as the authors' code",
                                                  "weights have RePo maps on layers [0, 1, 3]"]),
    (converter_pe("continuous"), (), ["pe_config.dynamic_pe_mode='continuous' is not supported",
                                      "'none' (plain RoPE), 'nope' (NoPE layers) and "
                                      "'swigluex_multihead' (RePo)"]),
])
def test_refusals(pe, weights, fragments):
    with pytest.raises(rj.FormatError) as e:
        _hf_schemes(pe, weights)
    for f in fragments:
        assert f in str(e.value), str(e.value)


@pytest.mark.parametrize("pe,fragment", [
    ([REPO], "pe_config=['swigluex_multihead']: expected a JSON object"),
    ({"dynamic_pe_mode": 3}, "pe_config.dynamic_pe_mode=3: expected a string"),
    (converter_pe(REPO, "2"), "pe_config.dynmaic_pe_start_layer='2': expected a layer number"),
    (converter_pe(REPO, -1), "pe_config.dynmaic_pe_start_layer=-1: expected a layer number"),
    (converter_pe(REPO, True), "pe_config.dynmaic_pe_start_layer=True: expected a layer number"),
    (converter_pe(REPO, 0, 5), "pe_config.dynmaic_pe_layer_ids=5: expected layer numbers as a "
                               "comma-separated string"),
    (converter_pe(REPO, 0, "1,x"), "pe_config.dynmaic_pe_layer_ids='1,x': expected"),
    (converter_pe(REPO, 0, [1, "2"]), "pe_config.dynmaic_pe_layer_ids=[1, '2']: expected"),
    ({**converter_pe(REPO), "dynamic_pe_start_layer": 1.5},
     "pe_config.dynamic_pe_start_layer=1.5: expected a layer number"),
])
def test_pe_config_of_the_wrong_type(pe, fragment):
    with pytest.raises(rj.FormatError) as e:
        _hf_schemes(pe)
    assert fragment in str(e.value), str(e.value)


# ---- OLMo config.yaml ------------------------------------------------------------------------
def test_yaml_reads_floats_as_yaml_1_2(tmp_path):
    (tmp_path / "config.yaml").write_text(allenai_yaml())
    m = olmo_format.read_config(tmp_path / "config.yaml")
    assert m["layer_norm_eps"] == 1e-6 and isinstance(m["layer_norm_eps"], float)
    assert m["rope_theta"] == 500000 and isinstance(m["rope_theta"], int)
    loader = olmo_format._OlmoYamlLoader
    text = "a: 1e-6\nb: 5e5\nc: -2E+3\nd: .5\ne: 1.5\nf: 10\ng: 1_000\nh: '1e-6'\ni: 1e\nj: 0x1F\n"
    assert yaml.load(text, Loader=loader) == {"a": 1e-6, "b": 5e5, "c": -2e3, "d": 0.5, "e": 1.5,
                                              "f": 10, "g": 1000, "h": "1e-6", "i": "1e", "j": 31}
    assert yaml.safe_load("a: 1e-6") == {"a": "1e-6"}  # PyYAML's own loader is untouched


def test_yaml_floats_agree_with_omegaconf(tmp_path):
    """OLMo's trainer reads config.yaml through OmegaConf: every scalar form that AllenAI's
    configs use (and a few edge forms) must come out as the same value and type here."""
    from omegaconf import OmegaConf

    text = ("a: 1e-6\nb: 5e5\nc: -2E+3\nd: .5\ne: 1.5\nf: 10\ng: 1_000\nh: '1e-6'\ni: 1e\n"
            "j: 0x1F\nk: 1.0e+3\nl: .inf\nm: 6e-4\nn: true\no: null\np: 5e12\n")
    ours = yaml.load(text, Loader=olmo_format._OlmoYamlLoader)
    theirs = OmegaConf.to_container(OmegaConf.create(text))
    assert ours == theirs
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in theirs.items()}
    (tmp_path / "config.yaml").write_text(allenai_yaml())
    assert olmo_format.read_config(tmp_path / "config.yaml") == \
        OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))["model"]


def _olmo_model(**changes):
    m = yaml.load(allenai_yaml(), Loader=olmo_format._OlmoYamlLoader)["model"]
    return {**m, **changes}


@pytest.mark.parametrize("changes,fragment", [
    (dict(layer_norm_eps="abc"), "model.layer_norm_eps='abc': expected a number"),
    (dict(layer_norm_eps=True), "model.layer_norm_eps=True: expected a number"),
    (dict(n_layers=4.5), "model.n_layers=4.5: expected an integer"),
    (dict(d_model=None), "model.d_model=None: expected an integer"),
    (dict(n_kv_heads="two"), "model.n_kv_heads='two': expected an integer or null"),
    (dict(weight_tying="no"), "model.weight_tying='no': expected true or false"),
    (dict(rope=1), "model.rope=1: expected true or false"),
    (dict(rope_theta=[5]), "model.rope_theta=[5]: expected a number"),
    (dict(layer_norm_type=["rms"]), "model.layer_norm_type=['rms']: expected a string"),
    (dict(dynamic_pe_mode=REPO, dynamic_pe_layer_ids=[1, 3]),
     "model.dynamic_pe_layer_ids=[1, 3]: expected a string"),
    (dict(dynamic_pe_mode=REPO, dynamic_pe_start_layer="x"),
     "model.dynamic_pe_start_layer='x': expected an integer"),
    (dict(dynamic_pe_mode=REPO, dynamic_pe_start_layer=-1),
     "model.dynamic_pe_start_layer=-1: expected a layer number"),
    (dict(dynamic_pe_mode="attention"), "model.dynamic_pe_mode='attention' is not supported"),
])
def test_olmo_config_of_the_wrong_type(changes, fragment):
    with pytest.raises(rj.FormatError) as e:
        olmo_format.config_from_olmo(_olmo_model(**changes), (), "config.yaml")
    assert f"config.yaml: {fragment}" in str(e.value), str(e.value)


def test_olmo_numbers_as_strings_convert_as_omegaconf_does():
    cfg = olmo_format.config_from_olmo(
        _olmo_model(layer_norm_eps="1e-5", n_layers="4", dynamic_pe_mode=REPO,
                    dynamic_pe_start_layer="1", dynamic_pe_layer_ids=3), (3,), "config.yaml")
    assert cfg.rms_norm_eps == 1e-5 and cfg.layer_schemes == schemes(repo=(3,))


def test_olmo_layout_follows_the_same_rules():
    """OLMo's fork reads the correct spelling; a misspelled key its weights follow
    loads with the warning, and no matching reading is refused."""
    m = _olmo_model(dynamic_pe_mode=REPO, dynamic_pe_start_layer=0, dynmaic_pe_start_layer=2)
    assert olmo_format.config_from_olmo(m, tuple(range(4)), "c").layer_schemes == schemes(
        repo=range(4))
    with pytest.warns(PeConfigWarning, match=r"RePo maps on layers \[2, 3\] "
                                             r"\(model.dynmaic_pe_start_layer=2\)"):
        cfg = olmo_format.config_from_olmo(m, (2, 3), "c")
    assert cfg.layer_schemes == schemes(repo=(2, 3))
    with pytest.raises(rj.FormatError, match=r"RePo on layers \[0, 1, 2, 3\] as the authors' code "
                                             r"reads it \(model.dynamic_pe_start_layer=0\) and on "
                                             r"layers \[2, 3\]"):
        olmo_format.config_from_olmo(m, (1, 2, 3), "c")


def test_config_yaml_type_error_is_one_line(tmp_path, capsys, plain):
    write_case("5 AllenAI config.yaml", tmp_path / "src", plain)
    (tmp_path / "src/config.yaml").write_text(allenai_yaml().replace("mlp_ratio: 3",
                                                                     "mlp_ratio: three"))
    capsys.readouterr()
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'src/config.yaml'}: model.mlp_ratio='three': expected "
                     "an integer"]


# ---- export ------------------------------------------------------------------------------------
def _pe_of(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["pe_config"]


@pytest.mark.parametrize("name,mode,start,ids", [
    ("1 plain (pe_config mode none)", "none", 0, ""),
    ("2 nope, ids '1,3'", "nope", 1, "1,3"),
    ("2 nope, all layers", "nope", 0, ""),
    ("3 ids '0,1,3' start 1", REPO, 1, "1,3"),
])
def test_export_writes_a_mode_their_code_reads(name, mode, start, ids, plain, tmp_path):
    """Both spellings equal, the mode their code knows; read back (as their code reads
    it) the export is the same model."""
    _, reference = write_case(name, tmp_path / "src", plain)
    import_checkpoint(tmp_path / "src", tmp_path / "rj", log=_quiet)
    notes = []
    result = export_model(tmp_path / "rj", tmp_path / "out", log=notes.append)
    assert result["note"] is None and not any(n.startswith("note:") for n in notes)
    assert _pe_of(tmp_path / "out") == converter_pe(mode, start, ids)
    back = rj.load_model(tmp_path / "out")
    assert back.config.layer_schemes == CASES[name][3]
    assert float(np.abs(np.asarray(back(jnp.asarray(IDS))) - reference).max()) < TOL


def test_export_of_a_model_their_code_cannot_express(tmp_path):
    """NoPE below RePo (the project's base_scheme nope): exported as RePo, with a note
    saying their code runs the NoPE layers with RoPE."""
    cfg = rj.ModelConfig(**SMALL, layer_schemes=("nope", "nope", "repo", "repo"))
    save_model_dir(tmp_path / "rj", cfg, tokenizer=False)
    logged = []
    result = export_model(tmp_path / "rj", tmp_path / "out", log=logged.append)
    assert _pe_of(tmp_path / "out") == converter_pe(REPO, 2, "")
    note = [line for line in logged if line.startswith("note: ")]
    assert len(note) == 1 and note[0] == f"note: {result['note']}"
    assert "runs layers [0, 1] with RoPE" in note[0]
    # ... which is what reading it back gives, as the note says
    assert rj.load_model(tmp_path / "out").config.layer_schemes == ("rope", "rope", "repo", "repo")
