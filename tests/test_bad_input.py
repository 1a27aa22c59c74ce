"""Bad input to `generate`, `eval`, `positions`, train.py's config and the data
readers: one `error:` line naming the file, flag or value, a non-zero exit, no
traceback, and nothing written. The CLIs run in-process through `cli.run` (what
`python -m` runs); one case per entry point runs as a real process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from repo_jax.cli import run
from repo_jax.data.sources import DataError, NpyTokens, text_documents
from repo_jax.eval.__main__ import main as eval_main
from repo_jax.generate import main as generate_main
from repo_jax.positions import main as positions_main
from tests.cli_checkpoints import one_line_error, save_model_dir, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = jax.devices()[0].platform in ("gpu", "cuda")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("bad") / "model", tiny_config())


def _refused(main, argv, capsys, *fragments) -> str:
    capsys.readouterr()
    assert run(main, [str(a) for a in argv]) == 2
    line = one_line_error(capsys.readouterr().err)
    for f in fragments:
        assert f in line, line
    return line


def test_command_line_numbers_paths_and_platform(checkpoint, tmp_path, capsys):
    ck = ["--checkpoint", checkpoint]
    # Numbers out of range, refused before the model loads.
    _refused(generate_main, [*ck, "--prompt", "the sun", "--seed", "-1"], capsys,
             "--seed -1: must be >= 0")
    _refused(generate_main, [*ck, "--prompt", "the sun", "--temperature", "nan"], capsys,
             "--temperature nan")
    _refused(eval_main, [*ck, "--task", "niah", "--context-lengths", "1024,100000000"], capsys,
             "--context-lengths 1024,100000000: 100000000 tokens is over the 131072")
    _refused(eval_main, [*ck, "--task", "copa", "--max-length", "-5"], capsys,
             "--max-length -5: must be at least 2")
    # ... and against the model: the KV cache would be allocated for all of it.
    _refused(generate_main, [*ck, "--prompt", "the sun", "--max-new-tokens", "100000000"],
             capsys, "--max-new-tokens 100000000", "exceeds the model's context of 128 tokens")
    # Paths of the wrong kind.
    _refused(eval_main, [*ck, "--task", "copa", "--output", tmp_path], capsys,
             f"--output {tmp_path}: is a directory; give a file path")
    (tmp_path / "dir.png").mkdir()
    _refused(positions_main, [*ck, "--text", "the sun", "--out", tmp_path / "dir.png"], capsys,
             "dir.png: is a directory")
    (tmp_path / "afile").write_text("")
    _refused(eval_main, [*ck, "--task", "copa", "--output", tmp_path / "afile" / "x.json"],
             capsys, "afile is a file, not a directory")
    # Undecodable text.
    (tmp_path / "latin1.txt").write_bytes("the sun\ncaf\xe9 is open".encode("latin-1"))
    _refused(eval_main, [*ck, "--task", "perplexity", "--file", tmp_path / "latin1.txt",
                         "--output", tmp_path / "p.json"], capsys,
             "latin1.txt:2: not UTF-8 text (byte 11)")
    # A kernel the platform cannot run: named, with the alternatives.
    if not ON_GPU:
        _refused(generate_main, [*ck, "--prompt", "the sun", "--attention-impl", "cudnn"],
                 capsys, "--attention-impl cudnn needs an NVIDIA GPU, but JAX runs on cpu here; "
                 "use xla or blockwise")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dir.png", "latin1.txt"]


def test_damaged_checkpoint_files(checkpoint, tmp_path, capsys):
    import shutil

    bad_tok = Path(shutil.copytree(checkpoint, tmp_path / "tok"))
    (bad_tok / "tokenizer.json").write_text("{not json")
    _refused(generate_main, ["--checkpoint", bad_tok, "--prompt", "the sun"], capsys,
             f"{bad_tok / 'tokenizer.json'}: not a readable tokenizer.json")
    bad_meta = Path(shutil.copytree(checkpoint, tmp_path / "meta"))
    (bad_meta / "repo_jax.json").write_bytes(b'{"format": "\xff"}')
    _refused(generate_main, ["--checkpoint", bad_meta, "--prompt", "the sun"], capsys,
             "repo_jax.json: not UTF-8 text")
    (bad_meta / "repo_jax.json").write_text("[1, 2]")
    _refused(generate_main, ["--checkpoint", bad_meta, "--prompt", "the sun"], capsys,
             "repo_jax.json: not a JSON object")
    good = json.loads((Path(checkpoint) / "repo_jax.json").read_text())
    for metadata, fragment in (([1], "metadata is a list, not a JSON object"),
                               ({"repo_layers": "1,2"}, "metadata.repo_layers='1,2' is not a list")):
        (bad_meta / "repo_jax.json").write_text(json.dumps({**good, "metadata": metadata}))
        _refused(generate_main, ["--checkpoint", bad_meta, "--prompt", "the sun"], capsys, fragment)


def test_train_config_reading(tmp_path, capsys):
    """train.py's config: a directory, non-UTF-8 YAML, numbers out of range."""
    (tmp_path / "latin1.yaml").write_bytes("steps: 3 # caf\xe9\n".encode("latin-1"))
    cases = [(["--config", str(tmp_path)], f"config file {tmp_path} is a directory"),
             (["--config", str(tmp_path / "latin1.yaml")], "is not UTF-8 text (byte 14)"),
             (["seed=-1"], "seed=-1 must be >= 0"),
             (["data.max_documents=-2"], "data.max_documents=-2 must be >= 0"),
             (["data.source=text", "data.paths=[x.txt]", "data.eos_token_id=100352"],
              "data.eos_token_id=100352 is outside the model's vocabulary [0, 100352)")]
    if not ON_GPU:
        cases.append((["model.attention_impl=cudnn"], "model.attention_impl=cudnn needs an "
                       "NVIDIA GPU, but JAX runs on cpu here; use xla or blockwise"))
    for argv, fragment in cases:
        capsys.readouterr()
        assert train.main([*argv, f"run_dir={tmp_path / 'run'}"]) == 2
        assert fragment in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_real_processes_exit_nonzero_without_traceback(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, fragment in [
            (["train.py", "--config", str(tmp_path)], "is a directory"),
            (["-m", "repo_jax.eval", "--checkpoint", str(tmp_path), "--task", "perplexity",
              "--file", str(tmp_path / "latin1.jsonl")], "latin1.jsonl:1: not UTF-8 text")]:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert fragment in one_line_error(proc.stderr)


# ---- data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value,shown", [(None, "None"), (5, "5"), ({"a": 1}, "{'a': 1}")])
def test_jsonl_text_that_is_not_a_string(tmp_path, value, shown):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(DataError, match=f"docs.jsonl:3: 'text' is {shown}, not a string"):
        text_documents([f], "text")


def test_jsonl_missing_field_and_bad_encoding(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="docs.jsonl:1: no 'text' key; set data.text_field"):
        text_documents([f], "text")
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="docs.jsonl:2: not UTF-8 text"):
        text_documents([f], "text")


def test_npy_with_header_is_read_with_its_dtype(tmp_path):
    """A file written by np.save carries a header: its tokens are read as the header
    says, whatever data.token_dtype is; raw OLMo files still read as raw."""
    tokens = np.arange(1000, 1000 + 40, dtype=np.uint16)
    np.save(tmp_path / "saved.npy", tokens.reshape(4, 10))
    tokens.astype(np.uint32).tofile(tmp_path / "raw.npy")
    saved = NpyTokens([tmp_path / "saved.npy"], "uint32", seq_len=8)
    raw = NpyTokens([tmp_path / "raw.npy"], "uint32", seq_len=8)
    assert saved.num_instances == raw.num_instances == 5
    np.testing.assert_array_equal(saved.read(np.arange(5)), tokens.reshape(5, 8))
    np.testing.assert_array_equal(raw.read(np.arange(5)), tokens.reshape(5, 8))
    np.save(tmp_path / "floats.npy", tokens.astype(np.float32))
    with pytest.raises(DataError, match="floats.npy: a .npy of float32, not integer token ids"):
        NpyTokens([tmp_path / "floats.npy"], "uint32", seq_len=8)
