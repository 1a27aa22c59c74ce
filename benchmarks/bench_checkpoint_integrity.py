"""What checksumming a training step costs next to writing it.

Writes a step the way the trainer does (Orbax CheckpointManager, params + opt_state
items, async, with the sealing callback that writes checksums.json before the commit),
then times, side by side and best of N:

  orbax save     the save alone (Orbax's own wait until committed), no callback
  save + seal    the trainer's save (the same, plus checksums.json in the save thread)
  verify         step_integrity.verify of the whole step, as a resume does

and prints seconds, MB/s and the ratios. Files are read back from the page cache, as
right after a save; a resume after a reboot reads them from disk.

    python benchmarks/bench_checkpoint_integrity.py [--mb 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from repo_jax import step_integrity  # noqa: E402


def _tree(mb: int) -> dict[str, jax.Array]:
    """Random float32 arrays of about `mb` MB in 1024-wide rows (random: incompressible)."""
    rng = np.random.default_rng(0)
    rows = mb * 2**20 // 4 // 1024 // 16
    return {f"w{i}": jax.numpy.asarray(rng.standard_normal((rows, 1024), np.float32))
            for i in range(16)}


def _save(directory: Path, params, opt_state, seal: bool) -> float:
    def callback():
        step_integrity.write_manifest(directory / "1.orbax-checkpoint-tmp")

    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=callback if seal else None))
    manager = ocp.CheckpointManager(directory, options=options, item_names=("params", "opt_state"))
    t = time.perf_counter()
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            opt_state=ocp.args.StandardSave(opt_state)))
    manager.wait_until_finished()
    seconds = time.perf_counter() - t
    manager.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="parameter MB (opt_state: 2x)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    params = _tree(args.mb)
    opt_state = {"mu": jax.tree.map(lambda x: x * 0.5, params),
                 "nu": jax.tree.map(lambda x: x * x, params)}
    total = 3 * sum(x.nbytes for x in jax.tree.leaves(params)) / 1e6
    root = Path(tempfile.mkdtemp(dir=args.workdir))
    times: dict[str, list[float]] = {"orbax save": [], "save + seal": [], "verify": []}
    try:
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for seal, name in ((False, "orbax save"), (True, "save + seal")):
                d = root / name.replace(" ", "_")
                shutil.rmtree(d, ignore_errors=True)
                times[name].append(_save(d, params, opt_state, seal))
            t = time.perf_counter()
            step_integrity.verify(root / "save_+_seal" / "1")
            times["verify"].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"step of {total:.0f} MB (params + Adam mu, nu), float32, best of {args.repeats}, "
          f"{jax.devices()[0].platform}")
    print(f"{'':14} {'seconds':>8} {'MB/s':>8}")
    for k, v in best.items():
        print(f"{k:14} {v:8.2f} {total / v:8.0f}")
    print(f"save + seal / orbax save: {best['save + seal'] / best['orbax save']:.2f}x; "
          f"verify / orbax save: {best['verify'] / best['orbax save']:.2f}x")


if __name__ == "__main__":
    main()
