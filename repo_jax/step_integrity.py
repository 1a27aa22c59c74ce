"""Checksums of a training checkpoint step, and finding the newest step that verifies.

Each step directory (run_dir/checkpoints/<step>/) holds `checksums.json`: the size and
CRC-32 of every file of its items (params/, opt_state/, train/) and of repo_jax.json.
The trainer writes it inside Orbax's temporary step directory, after the arrays are
written and before Orbax renames that directory to <step>, so a step that exists is
complete and carries its own checksums. A step without them, or whose files do not
match them, is never used: resuming moves it aside to <step>.corrupt-<reason> and takes
the newest step that verifies; loaders skip it (or refuse it when named explicitly).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

MANIFEST = "checksums.json"
FORMAT = "repo-jax-checksums"
# Orbax rewrites these two at commit time, after our manifest: not covered (they hold
# timestamps, no data).
_UNCOVERED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
_BLOCK = 16 << 20


class BadStep(Exception):
    """A step fails verification; `reason` is one word for the directory name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _covered(step_dir: Path) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel not in _UNCOVERED:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str | os.PathLike) -> None:
    """Record size and CRC-32 of every data file of `step_dir` (durably, written last)."""
    step_dir = Path(step_dir)
    files = {rel: [(step_dir / rel).stat().st_size, _crc32(step_dir / rel)]
             for rel in _covered(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": 1, "algorithm": "crc32", "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def is_training_step(step_dir: str | os.PathLike) -> bool:
    """A step of a training run (Orbax items), as opposed to a converted model directory."""
    return (Path(step_dir) / "train").is_dir() or (Path(step_dir) / MANIFEST).exists()


def verify(step_dir: str | os.PathLike, items: tuple[str, ...] | None = None) -> None:
    """Raise BadStep unless every recorded file (of `items`, e.g. ("params",); None: all)
    is present with its recorded size and checksum."""
    step_dir = Path(step_dir)
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
    except FileNotFoundError:
        raise BadStep("incomplete", f"no {MANIFEST}: the save did not finish") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadStep("checksum", f"{MANIFEST} is unreadable") from None
    wanted = [rel for rel in files
              if items is None or rel.split(os.sep)[0] in items or rel == "repo_jax.json"]
    if items is None and "params" not in {rel.split(os.sep)[0] for rel in files}:
        raise BadStep("incomplete", f"{MANIFEST} lists no parameter files")
    for rel in sorted(wanted):
        size, crc = files[rel]
        path = step_dir / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise BadStep("missing", f"{rel} is missing") from None
        if actual != size:
            raise BadStep("truncated", f"{rel} has {actual} bytes, {size} were written")
        if _crc32(path) != crc:
            raise BadStep("checksum", f"{rel} does not match its checksum (the data changed "
                                      "after it was written)")


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """The numbered step directories under `root`, newest first."""
    root = Path(root)
    steps = [d for d in root.iterdir() if d.name.isdigit() and d.is_dir()] if root.is_dir() else []
    return sorted(steps, key=lambda d: int(d.name), reverse=True)


def move_aside(step_dir: str | os.PathLike, reason: str) -> Path:
    """Rename a bad step to <step>.corrupt-<reason>[-k] (kept for inspection; neither Orbax
    nor the loaders see it as a step any more)."""
    step_dir = Path(step_dir)
    target = step_dir.with_name(f"{step_dir.name}.corrupt-{reason}")
    k = 1
    while target.exists():
        k += 1
        target = step_dir.with_name(f"{step_dir.name}.corrupt-{reason}-{k}")
    step_dir.rename(target)
    return target
