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
from tests.convert_helpers import edit_safetensors_header, olmo_config, save_bin, save_olmo

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


_Q, _K = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"


def _shard_elsewhere(src: Path, name: str | None):
    """Move the second shard out of SRC, next to it; the index then names it by
    `name` ('{}': the file name, '{abs}': its absolute path), or with None the
    shard is left in place as a symlink to it."""
    shard = _second_shard(src)
    outside = src.parent / "outside" / shard
    outside.parent.mkdir()
    (src / shard).rename(outside)
    if name is None:
        (src / shard).symlink_to(outside)
        return
    new = name.format(shard, abs=outside)
    _edit_json(src / "model.safetensors.index.json", lambda i: i["weight_map"].update(
        {k: new for k, v in i["weight_map"].items() if v == shard}))


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
    # Paths: a checkpoint may only name files inside its own directory.
    "index names a shard outside SRC": ("sharded", lambda s: _shard_elsewhere(s, "../outside/{}"),
                                        ["points outside", "../outside/model-00002-of-"]),
    "index names an absolute path": ("sharded", lambda s: _shard_elsewhere(s, "{abs}"),
                                     ["points outside", "/outside/model-00002-of-"]),
    "shard is a symlink out of SRC": ("sharded", lambda s: _shard_elsewhere(s, None),
                                      ["is a link to", "outside", "copy the file into"]),
    "index weight_map value null": ("sharded", lambda s: _edit_json(
        s / "model.safetensors.index.json", lambda i: i["weight_map"].update(
            {next(iter(i["weight_map"])): None})), ["weight_map['", "is None, not a shard file"]),
    # Forged or corrupt safetensors headers, refused before anything is allocated.
    "overlapping data_offsets": ("hf", lambda s: edit_safetensors_header(
        s / "model.safetensors", lambda h: h[_K].update(data_offsets=h[_Q]["data_offsets"])),
        ["overlap", "self_attn.o_proj.weight", "self_attn.q_proj.weight"]),
    "data_offsets past the end": ("hf", lambda s: edit_safetensors_header(
        s / "model.safetensors", lambda h: h[_K].update(
            data_offsets=[10**9, 10**9 + 64 * 64 * 4])), ["model.safetensors: truncated"]),
    "dtype is a list": ("hf", lambda s: edit_safetensors_header(
        s / "model.safetensors", lambda h: h[_K].update(dtype=["F32"])),
        ["tensor 'model.layers.0.self_attn.o_proj.weight'", "dtype ['F32'] is not a string"]),
    "negative shape": ("hf", lambda s: edit_safetensors_header(
        s / "model.safetensors", lambda h: h[_K].update(shape=[-64, -64])),
        ["shape [-64, -64] is not a list of non-negative integers"]),
    "huge header length": ("hf", lambda s: (s / "model.safetensors").write_bytes(
        (66_000_000).to_bytes(8, "little") + (s / "model.safetensors").read_bytes()[8:]),
        ["header of 66000000 bytes exceeds the 16777216 byte limit"]),
    # Impossible config.json numbers: one line naming the key, before any work.
    "num_hidden_layers beyond the weights": ("hf", lambda s: _edit_json(
        s / "config.json", lambda c: c.update(num_hidden_layers=1_000_000)),
        ["config.json: num_hidden_layers=1000000 but the weights hold 4 layer(s) (layers 0 to 3)"]),
    "OLMo n_layers beyond the weights": ("olmo", lambda s: (s / "config.yaml").write_text(
        yaml.safe_dump(olmo_config(rj.ModelConfig(**SMALL), n_layers=1_000_000))),
        ["config.yaml: model.n_layers=1000000 but the weights hold 4 layer(s)"]),
    "zero attention heads": ("hf", lambda s: _edit_json(
        s / "config.json", lambda c: c.update(num_attention_heads=0)),
        ["config.json: num_attention_heads=0 must be a positive integer"]),
    "hidden_size a string": ("hf", lambda s: _edit_json(
        s / "config.json", lambda c: c.update(hidden_size="64")),
        ["config.json: hidden_size='64' must be a positive integer"]),
    "rms_norm_eps null": ("hf", lambda s: _edit_json(
        s / "config.json", lambda c: c.update(rms_norm_eps=None)),
        ["config.json: rms_norm_eps=None must be a positive number"]),
    "config.json not UTF-8": ("hf", lambda s: (s / "config.json").write_bytes(b'{"a": "\xe9"}'),
                              ["config.json: not UTF-8 text; re-save it as UTF-8"]),
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
    """--overwrite replaces only a model directory or an empty one; anything else at
    DST is refused with nothing deleted."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _fails(["import", good["base"] / "hf", dst], capsys, "already exists; pass --overwrite")
    _fails(["import", good["base"] / "hf", dst, "--overwrite"], capsys,
           "is not a repo-jax model directory (it holds keep.txt)", "nothing was deleted")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # A file where the directory would go, with or without --overwrite.
    (tmp_path / "afile").write_text("mine")
    for extra in ([], ["--overwrite"]):
        _fails(["import", good["base"] / "hf", tmp_path / "afile", *extra], capsys,
               "afile: exists and is not a directory")
    _fails(["import", good["base"] / "hf", tmp_path / "afile" / "dst"], capsys,
           "afile: not a directory")
    assert (tmp_path / "afile").read_text() == "mine"
    # An empty directory is replaced; so is a model directory, but only by a
    # conversion that succeeds: a failing one leaves it as it was.
    shutil.rmtree(dst)
    dst.mkdir()
    assert main(["import", str(good["base"] / "hf"), str(dst), "--overwrite"]) == 0
    meta = (dst / "repo_jax.json").read_text()
    src = _copy(good, "hf", tmp_path)
    _rewrite(src / "model.safetensors", _nan)
    _fails(["import", src, dst, "--overwrite"], capsys, "NaN or Inf")
    assert (dst / "repo_jax.json").read_text() == meta
    assert main(["import", str(good["base"] / "repo"), str(dst), "--overwrite"]) == 0
    assert rj.load_model(dst).config.repo_layers == (1, 2, 3)
    assert sorted(p.name for p in dst.iterdir()) == ["params", "repo_jax.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dst", "src"]


def test_stale_partials_of_dead_imports_are_removed(good, tmp_path, capsys):
    """A killed import leaves `.DST.<pid>@<host>.*.partial`; the next import to DST
    removes those whose process is gone on this host, and no others."""
    from convert.staging import _host, staged

    dst = tmp_path / "dst"
    with staged(dst) as tmp:  # the name a real import's partial gets
        name = tmp.name
        assert name.startswith(f".dst.{os.getpid()}@") and name.endswith(".partial")
        (tmp / "params").mkdir()
    shutil.rmtree(dst)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        host = _host()
        rand = name.split(".")[-2]
        stale = tmp_path / f".dst.{dead.pid}@{host}.{rand}.partial"
        replaced = tmp_path / f".dst.{dead.pid}@{host}.replaced"  # killed while swapping
        keep = [tmp_path / f".dst.{live.pid}@{host}.{rand}.partial",   # a live import
                tmp_path / f".dst.{dead.pid}@otherhost.{rand}.partial",  # another host's
                tmp_path / ".dst.abcd1234.partial",                     # owner unknown
                tmp_path / f".other.{dead.pid}@{host}.{rand}.partial"]  # another DST's
        for d in [stale, replaced, *keep]:
            d.mkdir()
            (d / "big").write_bytes(b"x" * 1000)
        capsys.readouterr()
        assert main(["import", str(good["base"] / "hf"), str(dst)]) == 0
        out = capsys.readouterr().out
        assert not stale.exists() and not replaced.exists()
        assert f"left by process {dead.pid}, which is gone" in out
        assert all(d.exists() for d in keep), [d for d in keep if not d.exists()]
    finally:
        live.kill()
        live.wait()


def test_storage_faults(good, tmp_path, capsys, monkeypatch):
    """A file-size limit (as on a full disk) while writing, in the tensorstore writer
    (import) and in the safetensors writer (export): one line naming DST, nothing
    left. A directory that cannot be created in (read-only): one line naming it."""
    assert main(["import", str(good["base"] / "hf"), str(tmp_path / "rj")]) == 0
    # The limit is set in the child itself: a preexec_fn would run Python between fork
    # and exec in this multithreaded (JAX) process.
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); "
              "from convert.__main__ import main; "
              f"codes = [main(['import', {str(good['base'] / 'hf')!r}, {str(tmp_path / 'a')!r}]), "
              f"main(['export', {str(tmp_path / 'rj')!r}, {str(tmp_path / 'b')!r}])]; "
              "sys.exit(10 * codes[0] + codes[1])")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 11, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    for line, dst in zip(lines, ("a", "b")):
        assert line.startswith(f"error: {tmp_path / dst}: File too large while writing it"), line
        _nothing_left(tmp_path / dst)

    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / ".c.partial"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    _fails(["import", good["base"] / "hf", tmp_path / "c"], capsys,
           f"error: {tmp_path}: cannot create a directory there (Read-only file system)")


def test_hugging_face_cache_snapshot_links_are_followed(good, tmp_path, capsys):
    """The one layout whose files link out of their directory: a hub cache snapshot,
    whose files link to ../../blobs/. It imports; the same links elsewhere do not."""
    cache = tmp_path / "models--org--tiny"
    snapshot = cache / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        blob = cache / "blobs" / f"hash-{name}"
        shutil.copy(good["base"] / "hf" / name, blob)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert main(["import", str(snapshot), str(tmp_path / "dst")]) == 0
    elsewhere = cache / "other" / "0123abc"
    shutil.copytree(snapshot, elsewhere, symlinks=True)
    _fails(["import", elsewhere, tmp_path / "dst2"], capsys, "config.json is a link to",
           "outside")


def test_destination_inside_source(good, tmp_path, capsys):
    src = _copy(good, "hf", tmp_path)
    _fails(["import", src, src / "out"], capsys, "overlaps the source")
    _fails(["import", src, tmp_path / "dst", "--verify", "--atol", "-1"], capsys,
           "--atol -1.0: must be a positive number")
    _nothing_left(tmp_path / "dst")


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
    (tmp_path / "taken" / "notes.md").write_text("mine")
    _fails(["export", tmp_path / "rj", tmp_path / "taken"], capsys, "already exists")
    _fails(["export", tmp_path / "rj", tmp_path / "taken", "--overwrite"], capsys,
           "is not a Hugging Face checkpoint directory (it holds notes.md)")
    assert (tmp_path / "taken" / "notes.md").read_text() == "mine"
    # A previous export is a Hugging Face directory, which --overwrite replaces.
    assert main(["export", str(tmp_path / "rj"), str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "rj"), str(tmp_path / "hf"), "--overwrite"]) == 0
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
