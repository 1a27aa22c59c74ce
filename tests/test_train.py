"""Training end to end on a tiny RePo model: loss, eval, metrics, TensorBoard,
checkpoints that are model directories, init_from, and the one-line failures.
(Accumulation and resuming onto another mesh are in test_sharding.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

import train as train_cli
from repo_jax import load_model, params_io
from repo_jax.data import open_sources
from repo_jax.train.loop import run
from tests._train_utils import MODEL, cli_args, config, final_params, write_tokens


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("data") / "tokens.npy", 12000)


def _tb_scalars(run_dir) -> dict[str, dict[int, float]]:
    """Read TensorBoard event files back (TFRecord framing around Event protos)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for f in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_loss_falls_with_eval_metrics_tensorboard_and_loadable_checkpoint(tmp_path, tokens):
    cfg = config(tmp_path, tokens, steps=16, log_every=4, eval_every=8, tensorboard=True,
                 **{"data.eval_fraction": 0.1, "checkpoint.every": 8, "checkpoint.keep": 1,
                    "optimizer.lr": 1e-2})
    summary = run(cfg)
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "z_loss"} <= set(r)
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(np.exp(evals[1]["eval_loss"]), rel=1e-6)
    # TensorBoard holds the same numbers.
    tb = _tb_scalars(run_dir)
    assert tb["loss"] == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)
    # keep=1: only the final step remains, and it is a repo-jax model directory.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["16"]
    assert summary["checkpoint"].endswith("checkpoints/16")
    # Recompute the final eval loss from the checkpoint through the public loader.
    model = load_model(run_dir)
    _, held = open_sources(cfg.data)
    batch = held.read(np.arange(cfg.eval_batches * cfg.batch_size) % held.num_instances)
    logits = np.asarray(model(batch), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = logz - np.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]
    assert ce.mean() == pytest.approx(evals[1]["eval_loss"], rel=1e-5)


def test_init_from_loads_source_and_reports_fresh_repo_maps(tmp_path, tokens):
    from flax import nnx

    from repo_jax.config import ModelConfig
    from repo_jax.model import Olmo2Model

    plain = ModelConfig.from_dict({k: v for k, v in MODEL.items() if k != "repo_start_layer"})
    repo_maps = [f"layers.{i}.self_attn.{m}.kernel" for i in (1, 2)
                 for m in ("content_map", "final_map", "gate_map")]
    source = Olmo2Model(plain, rngs=nnx.Rngs(7))
    src_dir = tmp_path / "olmo2"
    src_dir.mkdir()
    params_io.save_params(src_dir, params_io.flat_params(source))
    params_io.write_meta(src_dir, plain, {"source": "test"})
    src = {k: np.asarray(v) for k, v in params_io.flat_params(source).items()}

    # bfloat16 compute: master parameters (and so the checkpoint) stay float32.
    run(config(tmp_path, tokens, steps=1, init_from=str(src_dir),
               **{"optimizer.lr": 1e-12, "model.dtype": "bfloat16"}))
    report = json.loads((tmp_path / "run" / "init_from.json").read_text())
    assert report["fresh"] == repo_maps
    assert sorted(report["loaded"]) == sorted(src)
    trained = final_params(tmp_path / "run")
    for k, v in src.items():
        assert trained[k].dtype == np.float32
        np.testing.assert_allclose(trained[k], v, atol=1e-9, err_msg=k)


def _cli(capsys, args) -> tuple[int, str]:
    rc = train_cli.main(args)
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_nonfinite_loss_sets_aside_the_step_that_gave_it(tmp_path, tokens, capsys):
    run(config(tmp_path, tokens, steps=2, **{"checkpoint.every": 1, "optimizer.clip_norm": 0}))
    # From step 2 on, a huge lr makes step 3's update blow the weights up; step 4's loss is
    # non-finite. Step 3's weights gave it, so it must not be resumed from again.
    rc, err = _cli(capsys, cli_args(tmp_path, tokens, steps=6, **{
        "optimizer.lr": 1e30, "optimizer.clip_norm": 0, "checkpoint.every": 1}))
    line = _one_line_error(err)
    assert rc == 1
    step = int(line.split("at step ")[1].split(";")[0])
    assert step >= 4, line
    ckpts = tmp_path / "run" / "checkpoints"
    kept = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert kept[-1] == step - 2, (line, kept)
    assert (ckpts / f"{step - 1}.corrupt-diverged").is_dir()
    assert f"step {step - 1}, whose weights gave it, was moved to" in line
    assert f"the last good checkpoint is step {step - 2}" in line
    # What a rerun resumes from and the loaders take: the step before.
    assert params_io.resolve_model_dir(tmp_path / "run") == ckpts / str(step - 2)
    assert all(np.isfinite(v).all() for v in final_params(tmp_path / "run").values())


@pytest.mark.parametrize("case", ["vocab", "missing", "empty_glob", "too_short", "mesh", "unknown_key",
                                  "init_from"])
def test_bad_input_is_one_clear_line(tmp_path, tokens, capsys, case):
    extra: dict = {}
    data = tokens
    expect = {"vocab": "outside model.vocab_size=256 in " + str(tmp_path / "big.npy"), "missing": "does not exist",
              "empty_glob": "no file matches", "too_short": "fewer than data.seq_len",
              "mesh": "do not divide across the mesh", "unknown_key": "optimizer.lrr",
              "init_from": "not a repo-jax model directory"}[case]
    if case == "vocab":
        data = write_tokens(tmp_path / "big.npy", 4000, vocab=400)
    elif case == "missing":
        data = tmp_path / "nope.npy"
    elif case == "empty_glob":
        data = tmp_path / "none-*.npy"
    elif case == "too_short":
        data = tmp_path / "short.npy"
        np.zeros(10, np.uint16).tofile(data)
    elif case == "mesh":
        extra = {"batch_size": 6}
    elif case == "init_from":
        extra = {"init_from": str(tmp_path / "no-model")}
    args = cli_args(tmp_path, data, **extra)
    if case == "unknown_key":
        args.append("optimizer.lrr=1")
    rc, err = _cli(capsys, args)
    assert rc == 2
    assert expect in _one_line_error(err)
    # Nothing was written for a run that could not start.
    assert not (tmp_path / "run").exists()
