"""Checkpoints under faults: checksums with fallback, a SIGKILL inside an async save, one
writer per run_dir, resuming under another config, storage faults while saving, and the
one-line refusals of bad training values."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train as train_cli
from convert.exporter import export_model
from repo_jax import load_model, params_io, step_integrity
from repo_jax.hf_format import FormatError
from repo_jax.run_lock import RunLock
from repo_jax.train.loop import run
from tests._train_utils import cli_args, config, losses, write_tokens

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("data") / "tokens.npy", 12000)


def _cli(capsys, args) -> tuple[int, str, str]:
    rc = train_cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _steps(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


def _largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_damaged_steps_are_skipped_refused_and_set_aside(tmp_path, tokens, capsys):
    run_dir = tmp_path / "run"
    run(config(tmp_path, tokens, steps=6))
    ckpts = run_dir / "checkpoints"
    assert _steps(run_dir) == {"2", "4", "6"}
    step_integrity.verify(ckpts / "6")
    # 64 bytes flipped in a parameter file of step 6; an optimizer file of step 4 truncated.
    victim = _largest(ckpts / "6" / "params")
    data = bytearray(victim.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])
    victim.write_bytes(bytes(data))
    victim = _largest(ckpts / "4" / "opt_state")
    victim.write_bytes(victim.read_bytes()[:-50])
    capsys.readouterr()

    # Loaders need only the parameters: the run resolves to step 4, saying why not 6.
    assert params_io.resolve_model_dir(run_dir) == ckpts / "4"
    warning = capsys.readouterr().err
    assert "skipped step 6 (params/" in warning and "does not match its checksum" in warning
    # A damaged step named explicitly is refused in one line, never read.
    with pytest.raises(FormatError, match=r"checkpoints/6: checkpoint step fails verification"):
        load_model(ckpts / "6")
    info = export_model(run_dir, tmp_path / "hf", log=lambda _: None)
    assert info["model_dir"] == str(ckpts / "4")

    # The trainer verifies everything: 6 and 4 are moved aside, it resumes from 2.
    summary = run(config(tmp_path, tokens, steps=8))
    out = capsys.readouterr().out
    assert "checkpoint step 6 is not usable: params/" in out
    assert f"moved to {ckpts / '6.corrupt-checksum'}" in out
    assert "checkpoint step 4 is not usable: opt_state/" in out and "bytes, " in out
    assert f"resumed from {ckpts / '2'} (step 2," in out
    assert summary["step"] == 8
    assert _steps(run_dir) == {"2", "4", "6", "8", "4.corrupt-truncated", "6.corrupt-checksum"}
    for step in ("4", "6", "8"):  # retrained and saved again, each verifiable
        step_integrity.verify(ckpts / step)


def _killed_in_save_of(step: int, args: list[str]) -> subprocess.CompletedProcess:
    """train.py, SIGKILLed inside Orbax's save thread while step `step` is being written
    (arrays on disk, not yet committed)."""
    code = f"""
import os, signal, sys
from pathlib import Path
from repo_jax import step_integrity
write = step_integrity.write_manifest
def dying(step_dir):
    if Path(step_dir).name.startswith("{step}."):
        os.kill(os.getpid(), signal.SIGKILL)
    write(step_dir)
step_integrity.write_manifest = dying
import train
sys.exit(train.main(sys.argv[1:]))
"""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_sigkill_inside_an_async_save_then_export_and_restart(tmp_path, tokens):
    run_dir = tmp_path / "run"
    args = cli_args(tmp_path, tokens, steps=6)
    proc = _killed_in_save_of(4, args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _steps(run_dir) == {"2", "4.orbax-checkpoint-tmp"}
    # The crashed run is usable as it lies: its complete step is a model directory.
    info = export_model(run_dir, tmp_path / "hf", log=lambda _: None)
    assert info["model_dir"] == str(run_dir / "checkpoints" / "2")
    assert load_model(run_dir).config.num_hidden_layers == 3
    # The kernel released the dead trainer's lock; the restart resumes from step 2.
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {run_dir / 'checkpoints' / '2'} (step 2," in proc.stdout
    assert _steps(run_dir) == {"2", "4", "6"}
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_one_trainer_per_run_dir(tmp_path, tokens, capsys):
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir)
    rc, _, err = _cli(capsys, cli_args(tmp_path, tokens))
    line = _one_line_error(err)
    assert rc == 2
    assert f"is in use by a running trainer (pid {os.getpid()} on host {socket.gethostname()})" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    lock.release()
    # A holder killed with SIGKILL leaves no stale lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from repo_jax.run_lock import "
                               f"RunLock; RunLock({str(run_dir)!r}); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"pid {holder.pid} "):
        RunLock(run_dir)
    holder.kill()
    holder.wait()
    RunLock(run_dir).release()


def test_defaults_on_then_resume_under_changed_config(tmp_path, tokens, capsys):
    # Progress bar, TensorBoard and log_every=1 on, steps=1: the first logged step has no
    # throughput yet.
    on = {"progress": True, "tensorboard": True, "log_every": 1}
    rc, out, err = _cli(capsys, cli_args(tmp_path, tokens, steps=1, **on))
    assert rc == 0 and "Traceback" not in err, err
    assert "done at step 1" in out
    step_dir = tmp_path / "run" / "checkpoints" / "1"
    rc, _, err = _cli(capsys, cli_args(tmp_path, tokens, steps=2, **on, **{
        "model.rope_theta": 10000, "optimizer.clip_norm": 0}))
    line = _one_line_error(err)
    assert rc == 2
    assert (f"{step_dir} was trained under another config: model.rope_theta: 500000.0 -> 10000.0; "
            "optimizer.clip_norm: 1.0 -> 0.0 (turns clipping off)") in line
    assert "resume_with_changed_config=true" in line
    # Explicitly allowed (and logged); a resume whose first logged step has no throughput.
    rc, out, err = _cli(capsys, cli_args(tmp_path, tokens, steps=2, resume_with_changed_config=True,
                                         **on, **{"model.rope_theta": 10000}))
    assert rc == 0 and "Traceback" not in err, err
    assert ("resuming step 1 under a changed config (resume_with_changed_config=true): "
            "model.rope_theta: 500000.0 -> 10000.0") in out + err
    assert "done at step 2" in out


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=.nan", "optimizer.lr=nan"), ("z_loss=.nan", "z_loss=nan"),
    ("optimizer.eps=.inf", "optimizer.eps=inf"), ("optimizer.b2=1.5", "optimizer.b2=1.5"),
    ("schedule.final_fraction=.nan", "schedule.final_fraction=nan"), ("seed=-1", "seed=-1"),
    ("model.rope_theta=.inf", "rope_theta=inf"), ("run_dir=", "run_dir is empty"),
    ("run_dir=FILE", "is a file, not a directory")])
def test_bad_training_values_are_one_line(tmp_path, tokens, capsys, monkeypatch, override, key):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a run\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # where an empty run_dir used to write
    args = cli_args(tmp_path, tokens) + [override.replace("FILE", str(a_file))]
    rc, _, err = _cli(capsys, args)
    assert rc == 2
    assert key in _one_line_error(err)
    assert not (tmp_path / "run").exists() and not list(cwd.iterdir())
    assert a_file.read_text() == "not a run\n"


def test_file_size_limit_during_a_save_is_one_line_and_keeps_the_last_good_step(tmp_path, tokens):
    run_dir = tmp_path / "run"
    run(config(tmp_path, tokens, steps=2))
    # A file-size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC).
    code = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.path.insert(0, ".")
runpy.run_path("train.py", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code, *cli_args(tmp_path, tokens, steps=4)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = _one_line_error(proc.stderr)
    assert proc.returncode == 1
    assert f"cannot save checkpoint step 4 in {run_dir / 'checkpoints'}: File too large (EFBIG)" in line
    assert "the last good checkpoint, step 2, is untouched" in line
    assert _steps(run_dir) - {"4.orbax-checkpoint-tmp"} == {"2"}  # tmp: next start removes it
    step_integrity.verify(run_dir / "checkpoints" / "2")


def test_permission_fault_while_sealing_a_step(tmp_path, tokens, capsys, monkeypatch):
    run(config(tmp_path, tokens, steps=2))
    capsys.readouterr()

    def refused(step_dir):
        raise PermissionError(13, "Permission denied", str(Path(step_dir) / "checksums.json"))

    monkeypatch.setattr(step_integrity, "write_manifest", refused)
    rc, _, err = _cli(capsys, cli_args(tmp_path, tokens, steps=4))
    line = _one_line_error(err)
    assert rc == 1
    assert "cannot save checkpoint step 4" in line and "Permission denied (EACCES): " in line
    assert "the last good checkpoint, step 2, is untouched" in line
    assert _steps(tmp_path / "run") - {"4.orbax-checkpoint-tmp"} == {"2"}
    np.testing.assert_equal(sorted(losses(tmp_path / "run")), [1, 2, 3, 4])


def test_step_with_nonfinite_values_is_set_aside(tmp_path, tokens, capsys):
    import shutil

    import jax

    run(config(tmp_path, tokens, steps=4))
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    # Step 4 rewritten with one NaN, checksums and all: its files verify, its values do not.
    shapes = params_io.saved_shapes(step_dir)
    values = {k: np.array(v) for k, v in params_io.restore_params(
        step_dir, {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}).items()}
    values["norm.weight"][0] = np.nan
    shutil.rmtree(step_dir / "params")
    params_io.save_params(step_dir, values)
    step_integrity.write_manifest(step_dir)
    capsys.readouterr()
    run(config(tmp_path, tokens, steps=6))
    out = capsys.readouterr().out
    assert ("checkpoint step 4 is not usable: its parameters or optimizer state hold NaN or Inf; "
            f"moved to {step_dir}.corrupt-nonfinite") in out
    assert f"resumed from {step_dir.parent / '2'} (step 2," in out
