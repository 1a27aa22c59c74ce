"""Side-by-side timing shared by the CPU micro-benchmarks."""
from __future__ import annotations

import time
from typing import Callable


def best_interleaved(sides: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Seconds per call, best of `reps` rounds in which every side runs once in turn (after
    one untimed call each), so that load and drift on a shared host hit all sides alike.
    Each callable must wait for its own result."""
    best = {name: float("inf") for name in sides}
    for fn in sides.values():
        fn()
    for _ in range(reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
