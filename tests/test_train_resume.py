"""Stop and crash at arbitrary points: SIGTERM saves and exits, SIGKILL loses at most
the steps since the last checkpoint, and the restarted run ends bit-identical to an
uninterrupted one (same per-step losses, same parameters)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from repo_jax.train.loop import run
from tests._train_utils import cli_args, config, final_params, losses, write_tokens

ROOT = Path(__file__).resolve().parents[1]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _signal_after(proc: subprocess.Popen, run_dir: Path, step: int, sig: int) -> str:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(s >= step for s in _logged_steps(run_dir)):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out = proc.communicate(timeout=240)[0]
    return out


def test_sigterm_then_sigkill_then_restart_matches_uninterrupted(tmp_path):
    data = write_tokens(tmp_path / "tokens.npy", 12000)
    extra = {"steps": 16, "checkpoint.every": 3, "checkpoint.keep": 3,
             "compilation_cache_dir": str(tmp_path / "xla_cache")}
    ref = tmp_path / "ref"
    run(config(ref, data, **{**extra, "compilation_cache_dir": ""}))
    args = cli_args(tmp_path, data, **extra)
    run_dir = tmp_path / "run"

    # SIGTERM: finish the current step, save it, exit 143.
    proc = _start(args)
    out = _signal_after(proc, run_dir, 4, signal.SIGTERM)
    assert proc.returncode == 143, out
    stopped = max(_logged_steps(run_dir))
    assert stopped < 16 and f"SIGTERM: saved step {stopped}" in out
    assert (run_dir / "checkpoints" / str(stopped) / "repo_jax.json").exists()

    # SIGKILL somewhere later (mid-step or mid-save), then restart to the end.
    proc = _start(args)
    out = _signal_after(proc, run_dir, stopped + 5, signal.SIGKILL)
    assert "resumed from" in out and f"(step {stopped}," in out
    killed_at = max(_logged_steps(run_dir))
    assert proc.returncode == -signal.SIGKILL and killed_at < 16, out
    proc = _start(args)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    assert "resumed from" in out
    assert os.listdir(tmp_path / "xla_cache")  # the restart found a persistent compilation cache

    # Every step logged once, with the losses and final parameters of the uninterrupted run.
    assert _logged_steps(run_dir) == list(range(1, 17))
    assert losses(run_dir) == losses(ref / "run")
    want, got = final_params(ref / "run"), final_params(run_dir)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
