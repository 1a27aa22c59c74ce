"""Bad input to `python -m convert`: one line on stderr naming the problem, exit
status 1, no traceback, nothing at DST (and an existing DST untouched); pickles that
would run code are refused without running it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import repo_jax as rj
from convert.__main__ import main
from tests.conftest import SMALL, add_repo_maps, hf_olmo2, write_hf_dir
from tests.convert_helpers import olmo_config, save_bin, save_olmo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Valid checkpoints to break: plain HF, sharded HF, RePo HF, OLMo."""
    base = tmp_path_factory.mktemp("good")
    plain = hf_olmo2(num_key_value_heads=2)
    plain_cfg = rj.ModelConfig(**{**SMALL, "num_key_value_heads": 2})
    sd = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    write_hf_dir(base / "hf", sd, plain_cfg)
    plain.save_pretrained(base / "sharded", max_shard_size="100KB")
    repo_cfg = rj.ModelConfig(**SMALL).replace(repo_start_layer=1)
    write_hf_dir(base / "repo", add_repo_maps(dict(hf_olmo2().state_dict()), repo_cfg), repo_cfg)
    save_olmo(base / "olmo", sd, plain_cfg, "pt")
    return dict(base=base, sd=sd, cfg=plain_cfg)


def _copy(good, name, tmp_path) -> Path:
    return Path(shutil.copytree(good["base"] / name, tmp_path / "src"))


def _fails(argv, capsys, *fragments) -> str:
    """Run the CLI in-process; it must fail cleanly with one line naming `fragments`."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _nothing_left(dst: Path):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def _rewrite(file: Path, change):
    sd = load_file(str(file))
    change(sd)
    save_file(sd, str(file), metadata={"format": "pt"})


def _edit_json(file: Path, change):
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def _second_shard(src: Path) -> str:
    files = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()
    return sorted(set(files))[1]


def _nan(sd):
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")


# name -> (checkpoint to start from, how to break it, fragments of the one error line)
CASES = {
    "no config": ("hf", lambda s: (s / "config.json").unlink(),
                  ["no config.json (Hugging Face) or config.yaml (OLMo)"]),
    "config not JSON": ("hf", lambda s: (s / "config.json").write_text("{ nope"),
                        ["config.json: not valid JSON"]),
    "unknown model_type": ("hf", lambda s: _edit_json(s / "config.json",
                                                      lambda c: c.update(model_type="llama")),
                           ["model_type='llama' is not supported"]),
    "config missing key": ("hf", lambda s: _edit_json(s / "config.json",
                                                      lambda c: c.pop("hidden_size")),
                           ["config.json: missing key 'hidden_size'"]),
    "config.yaml not OLMo-2": ("olmo", lambda s: (s / "config.yaml").write_text(yaml.safe_dump(
        {"model": {**olmo_config(rj.ModelConfig(**SMALL))["model"], "norm_after": False}})),
        ["config.yaml: model.norm_after=False", "OLMo-2"]),
    "config.yaml not YAML": ("olmo", lambda s: (s / "config.yaml").write_text("model: [1, 2\n"),
                             ["config.yaml: not valid YAML"]),
    "config.yaml without model": ("olmo", lambda s: (s / "config.yaml").write_text("seed: 1\n"),
                                  ["no OLMo model config"]),
    "no weights": ("hf", lambda s: (s / "model.safetensors").unlink(), ["config.json but no weights"]),
    "missing tensor": ("hf", lambda s: _rewrite(s / "model.safetensors",
                                                lambda sd: sd.pop("model.layers.2.mlp.down_proj.weight")),
                       ["missing tensor(s) ['model.layers.2.mlp.down_proj.weight']"]),
    "missing OLMo tensor": ("olmo", lambda s: torch.save(
        {k: v for k, v in torch.load(s / "model.pt").items() if "blocks.3.att_proj" not in k},
        s / "model.pt"), ["missing tensor(s) ['transformer.blocks.3.att_proj.weight']"]),
    "unexpected tensor": ("hf", lambda s: _rewrite(s / "model.safetensors", lambda sd: sd.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})),
        ["model.safetensors", "unexpected tensor 'model.layers.0.self_attn.rotary_emb.inv_freq'"]),
    "tensor for a layer the config lacks": ("hf", lambda s: _rewrite(s / "model.safetensors", lambda sd: sd.update(
        {"model.layers.7.mlp.up_proj.weight": torch.ones(96, 64)})),
        ["unexpected tensor 'model.layers.7.mlp.up_proj.weight' for this config (4 layers"]),
    "wrong shape": ("hf", lambda s: _rewrite(s / "model.safetensors", lambda sd: sd.update(
        {"model.layers.1.self_attn.o_proj.weight": torch.ones(64, 32)})),
        ["'model.layers.1.self_attn.o_proj.weight' has shape (64, 32), the config needs (64, 64)"]),
    "fused OLMo tensor of the wrong size": ("olmo", lambda s: (s / "config.yaml").write_text(yaml.safe_dump(
        olmo_config(rj.ModelConfig(**{**SMALL, "num_key_value_heads": 2}), mlp_hidden_size=200))),
        ["'transformer.blocks.0.ff_proj.weight' has shape (192, 64) but the config needs 200 = "
         "100 (up_proj) + 100 (gate_proj) rows"]),
    "truncated safetensors": ("hf", lambda s: os.truncate(s / "model.safetensors",
                                                          (s / "model.safetensors").stat().st_size - 100),
                              ["model.safetensors: truncated"]),
    "corrupt safetensors header": ("hf", lambda s: (s / "model.safetensors").write_bytes(
        (s / "model.safetensors").read_bytes()[:8] + b"\x00garbage" + (s / "model.safetensors").read_bytes()[16:]),
        ["model.safetensors: corrupt safetensors header"]),
    "index names a missing shard": ("sharded", lambda s: (s / _second_shard(s)).unlink(),
                                    ["names shard 'model-00002-of-", "which is missing"]),
    "RePo config disagrees with weights": ("repo", lambda s: _edit_json(s / "config.json", lambda c: c["pe_config"].update(
        dynamic_pe_start_layer=2, dynmaic_pe_start_layer=2)),
        ["gives RePo on layers [2, 3] as the authors' code reads it",
         "the weights have RePo maps on layers [1, 2, 3]"]),
    "RePo weights without pe_config": ("repo", lambda s: _edit_json(s / "config.json",
                                                                    lambda c: c.pop("pe_config")),
                                       ["RePo maps on layers [1, 2, 3]", "no pe_config"]),
    "non-finite values": ("hf", lambda s: _rewrite(s / "model.safetensors", _nan),
                          ["'model.layers.1.mlp.up_proj.weight'", "NaN or Inf (row 3)"]),
    "truncated .bin": ("hf", lambda s: (save_bin(s, load_file(str(s / "model.safetensors")),
                                                 json.loads((s / "config.json").read_text())),
                                        (s / "model.safetensors").unlink(),
                                        os.truncate(s / "pytorch_model.bin", 1000)),
                       ["pytorch_model.bin: not a readable torch zip checkpoint"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_import_input(case, good, tmp_path, capsys):
    start, damage, fragments = CASES[case]
    src = _copy(good, start, tmp_path)
    damage(src)
    print("\n" + _fails(["import", src, tmp_path / "dst"], capsys, *fragments))
    _nothing_left(tmp_path / "dst")


def test_existing_destination(good, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _fails(["import", good["base"] / "hf", dst], capsys, "already exists; pass --overwrite")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # A failing conversion with --overwrite leaves the old destination as it was.
    src = _copy(good, "hf", tmp_path)
    _rewrite(src / "model.safetensors", _nan)
    _fails(["import", src, dst, "--overwrite"], capsys, "NaN or Inf")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # A good one replaces it.
    assert main(["import", str(good["base"] / "hf"), str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["params", "repo_jax.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_destination_inside_source(good, tmp_path, capsys):
    src = _copy(good, "hf", tmp_path)
    _fails(["import", src, src / "out"], capsys, "overlaps the source")


def _evil_pickle(path: Path, marker: Path, tensors: dict):
    """A torch checkpoint whose unpickling would create `marker` (builtins.open)."""
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({**tensors, "extra": Payload()}, path)


@pytest.mark.parametrize("layout", ["hf-bin", "olmo-pt"])
def test_malicious_pickle_is_refused_not_run(layout, good, tmp_path, capsys):
    src = tmp_path / "src"
    marker = tmp_path / "pwned"
    if layout == "hf-bin":
        save_bin(src, good["sd"], json.loads((good["base"] / "hf/config.json").read_text()))
        weights = src / "pytorch_model.bin"
    else:
        src = _copy(good, "olmo", tmp_path)
        weights = src / "model.pt"
    _evil_pickle(weights, marker, torch.load(weights, weights_only=True))
    # The file really is hostile: a plain unpickle runs the payload.
    control = tmp_path / "control"
    _evil_pickle(tmp_path / "control.pt", control, {})
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    _fails(["import", src, tmp_path / "dst"], capsys, f"{weights.name}: refused to unpickle",
           "it would call io.open")
    assert not marker.exists()
    _nothing_left(tmp_path / "dst")


def test_malicious_olmo_safetensors_key(good, tmp_path, capsys):
    """OLMo's safetensors keys are pickles; one carrying code is refused unrun."""
    import base64
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = tmp_path / "src"
    save_olmo(src, good["sd"], good["cfg"], "safetensors")
    evil = base64.urlsafe_b64encode(pickle.dumps(((Payload(),), False))).decode()
    _rewrite(src / "model.safetensors", lambda sd: sd.update({evil: torch.ones(1)}))
    _fails(["import", src, tmp_path / "dst"], capsys, "refused global io.open")
    assert not marker.exists()
    _nothing_left(tmp_path / "dst")


def test_bad_export_input(good, tmp_path, capsys):
    _fails(["export", good["base"] / "hf", tmp_path / "out"], capsys, "not a repo-jax model directory")
    assert main(["import", str(good["base"] / "hf"), str(tmp_path / "rj")]) == 0
    _fails(["export", tmp_path / "rj", tmp_path / "out", "--shard-size", "lots"], capsys,
           "--shard-size 'lots'")
    (tmp_path / "taken").mkdir()
    _fails(["export", tmp_path / "rj", tmp_path / "taken"], capsys, "already exists")
    # A diverged run: NaN in the saved parameters is refused, not exported.
    from repo_jax import params_io

    model = rj.load_model(tmp_path / "rj")
    params = params_io.flat_params(model)
    params["norm.weight"] = np.array(params["norm.weight"])
    params["norm.weight"][7] = np.inf
    params_io.save_params(tmp_path / "nan", params)
    params_io.write_meta(tmp_path / "nan", model.config, {})
    _fails(["export", tmp_path / "nan", tmp_path / "out"], capsys, "'norm.weight'", "NaN or Inf (row 7)")
    _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("case", ["index names a missing shard", "malicious pickle"])
def test_cli_process_exit_status(case, good, tmp_path):
    """The real `python -m convert` process: exit status 1, one stderr line, no traceback."""
    if case == "malicious pickle":
        src = _copy(good, "olmo", tmp_path)
        _evil_pickle(src / "model.pt", tmp_path / "pwned", {})
    else:
        src = _copy(good, "sharded", tmp_path)
        CASES[case][1](src)
    proc = subprocess.run([sys.executable, "-m", "convert", "import", str(src), str(tmp_path / "dst")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "pwned").exists()
    _nothing_left(tmp_path / "dst")
