"""The positions picture: a readable PNG of the requested size, the numbers it
draws, and clear refusals."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import repo_jax as rj
from repo_jax import step_integrity
from repo_jax.cli import run
from repo_jax.positions import main
from tests.cli_checkpoints import one_line_error, save_model_dir, tiny_config, word_tokenizer

TEXT = "the man ran to the open door and the sun was yellow . he fell in the water"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("pos") / "model", tiny_config())


def _png(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_one_head_png_and_numbers(checkpoint, tmp_path, capsys):
    out = tmp_path / "layer2.png"
    assert run(main, ["--checkpoint", str(checkpoint), "--text", TEXT, "--layer", "2",
                      "--head", "3", "--out", str(out), "--json", "--size", "640x360"]) == 0
    assert _png(out).shape[:2] == (360, 640)
    record = json.loads(out.with_suffix(".json").read_text())
    ids = word_tokenizer().encode(TEXT).ids
    assert record["token_ids"] == ids and record["layer"] == 2 and list(record["positions"]) == ["3"]
    assert record["tokens"][:3] == ["the", "man", "ran"]
    _, positions = rj.load_model(checkpoint)(jnp.asarray([ids]), return_positions=True)
    np.testing.assert_allclose(record["positions"]["3"], positions[2][0, 3], rtol=1e-5, atol=1e-5)
    # Learned, not integer: the scaled-up maps move tokens well off the diagonal.
    assert np.abs(np.asarray(record["positions"]["3"]) - np.arange(len(ids))).max() > 1.0
    assert "wrote" in capsys.readouterr().out


def test_all_heads_grid_from_a_training_run_directory(checkpoint, tmp_path, capsys):
    # A run directory: checkpoints/<step>/ model directories, the latest is used.
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "checkpoints" / "40")
    step_integrity.write_manifest(run_dir / "checkpoints" / "40")  # a finished training step
    out = tmp_path / "grid.png"
    assert run(main, ["--checkpoint", str(run_dir), "--text", TEXT, "--all-heads",
                      "--out", str(out)]) == 0
    image = _png(out)
    assert image.shape[0] > 300 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05  # something is drawn
    assert "heads 0, 1, 2, 3" in capsys.readouterr().out
    assert run(main, ["--checkpoint", str(run_dir), "--text", TEXT, "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["positions"]) == ["0"]


@pytest.mark.parametrize("args,needle", [
    (["--layer", "0"], "--layer 0 is not a RePo layer of"),
    (["--layer", "7"], "its RePo layers are [1, 2]"),
    (["--head", "4"], "--head 4 is outside the model's 4 heads"),
    (["--size", "big"], "--size 'big'"),
])
def test_refusals(checkpoint, tmp_path, capsys, args, needle):
    out = tmp_path / "x.png"
    assert run(main, ["--checkpoint", str(checkpoint), "--text", TEXT, "--out", str(out), *args]) == 2
    assert needle in one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_refuses_a_checkpoint_without_repo_layers(tmp_path):
    plain = save_model_dir(tmp_path / "plain", tiny_config(repo=False))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "repo_jax.positions", "--checkpoint", str(plain),
                           "--text", TEXT, "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "has no RePo layers" in one_line_error(proc.stderr)
    assert not (tmp_path / "x.png").exists()
