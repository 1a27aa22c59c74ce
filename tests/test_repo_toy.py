"""Smoke test of the toy experiment (`python -m experiments.repo_toy --quick`): every run
trains and is scored, the outputs are written and well formed, a rerun resumes, and
`python -m repo_jax.eval --task synthetic` scores a run exactly as the driver did.
It checks the plumbing, not the result (the quick plan trains for 4 steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_quick_run_writes_every_output_and_resumes(tmp_path):
    from experiments.repo_toy import ARMS, QUICK

    out, work = tmp_path / "out", tmp_path / "work"
    args = ["-m", "experiments.repo_toy", "--quick", "--jobs", "2", "--out", str(out), "--work", str(work)]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert sorted(runs) == sorted(f"{a}-s0" for a in ARMS)
    for name, r in runs.items():
        assert r["status"] == "ok", (name, r.get("error"))
        assert r["plan"] == QUICK.tag
        tasks = {row["task"] for row in r["eval"]}
        assert tasks == {"recall", "lookup", "induction"}
        for row in r["eval"]:
            assert 0.0 <= row["accuracy"] <= 1.0 and row["answer_loss"] > 0 and row["examples"] == 4
        yarn = [row for row in r["eval"] if row["task"] == "induction" and row["yarn"]]
        assert sorted(row["multiple"] for row in yarn) == [2, 4]
        assert r["curve"] and r["curve"][-1]["step"] == r["steps"]
    # Continuations start from their base: the base's weights, RePo maps fresh.
    assert runs["cont_repo-s0"]["steps"] == runs["base-s0"]["steps"] == QUICK.steps // 2
    init = json.loads((work / QUICK.tag / "cont_repo-s0" / "init_from.json").read_text())
    assert init["fresh"] and all("map" in k for k in init["fresh"])
    assert "positions" in runs["repo-s0"] and "positions" not in runs["rope-s0"]
    z = runs["repo-s0"]["positions"]["layers"]["1"]["positions"]
    assert len(z) == 2 and len(z[0]) == len(runs["repo-s0"]["positions"]["tokens"])

    for name in ("accuracy_vs_noise.png", "accuracy_vs_length.png", "accuracy_vs_rows.png",
                 "learning_curves.png", "positions_repo_layer1.png", "positions_cont_repo_layer1.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tag"] == QUICK.tag and set(summary["runs"].values()) == {"ok"}
    assert summary["aggregate"]["repo"]["recall@0.0"]["n"] == 1
    results = (out / "results.md").read_text()
    for arm_label in ("| RoPE |", "| NoPE |", "| RePo (from layer 1) |", "continuation (control)"):
        assert arm_label in results
    assert "python -m experiments.repo_toy --quick" in (out / "command.md").read_text()

    again = _run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "6 run(s) already done, 0 to run" in again.stdout

    # The eval CLI scores a run as the driver did (same examples, same numbers).
    report = tmp_path / "eval.json"
    proc = _run("-m", "repo_jax.eval", "--task", "synthetic", "--checkpoint",
                str(work / QUICK.tag / "repo-s0"), "--examples", "4", "--output", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(report.read_text())["metrics"]["synthetic"]
    assert len(rows) == len(runs["repo-s0"]["eval"])
    for mine, theirs in zip(rows, runs["repo-s0"]["eval"]):
        assert {k: v for k, v in mine.items() if k != "answer_loss"} == \
            {k: v for k, v in theirs.items() if k != "answer_loss"}
        assert mine["answer_loss"] == pytest.approx(theirs["answer_loss"], rel=1e-5)


def test_bad_arguments_are_one_error_line(tmp_path):
    proc = _run("-m", "experiments.repo_toy", "--quick", "--jobs", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --jobs 0")
    proc = _run("-m", "experiments.repo_toy", "--quick", "--seeds", "0", "7", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --seeds 0 7")
    proc = _run("-m", "repo_jax.eval", "--task", "synthetic", "--checkpoint", str(tmp_path),
                "--synthetic-tasks", "copy")
    assert proc.returncode == 2 and "error: --synthetic-tasks 'copy'" in proc.stderr
