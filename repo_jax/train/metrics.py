"""Per-step metrics: progress bar, run_dir/metrics.jsonl, TensorBoard events.

Only the main process (process 0) writes. On resume, metrics.jsonl is cut back
to the steps at or before the restored checkpoint, so after any crash and
restart the file holds each step once, exactly as an uninterrupted run writes it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from repo_jax.storage import writing


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool,
                 progress: bool, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not enabled:
            return
        with writing(str(self.path)):
            run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate(start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def _truncate(self, start_step: int) -> None:
        """Keep whole lines for steps <= start_step (a kill can leave a partial last line)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", math.inf) <= start_step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with writing(str(self.path)), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.bar is not None:
            # The first logged step after (re)starting has no throughput yet (None).
            shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_sec", "mfu")
                     if isinstance(record.get(k), (int, float))}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _plain(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, (int, str)) else v
    except TypeError:
        return v
