"""Orbax CheckpointManager wrapper: async saves, keep-last-K, resume, any mesh.

Layout: run_dir/checkpoints/<step>/ is one Orbax step with items
  params     flat dict keyed by dotted NNX paths (as `params_io.flat_params`)
  opt_state  the Optax state
  train      JSON: step, data position (samples_seen), seed, batch and data facts
and, once the step is finalised, `repo_jax.json` (`params_io.write_meta`), which
makes each finished step a repo-jax model directory: `repo_jax.load_model(run_dir)`,
`convert export` and the generation/eval tools read training output directly.
Restoring takes abstract arrays with the *current* mesh's shardings, so a run
can resume on a different mesh shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from repo_jax import params_io
from repo_jax.config import CheckpointConfig, ModelConfig
from repo_jax.hf_format import FormatError
from repo_jax.train.state import TrainState


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig, model_cfg: ModelConfig,
                 scan_layers: bool):
        self.directory = Path(directory).absolute()
        self.model_cfg, self.scan_layers = model_cfg, scan_layers
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "train"))
        self._unmarked: list[int] = []
        self.mark_finished(list(self.manager.all_steps()))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, train_meta: dict[str, Any]) -> None:
        """Start an (async) save of `state`; returns once the arrays are copied off device."""
        step = int(train_meta["step"])
        self.manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            train=ocp.args.JsonSave(train_meta)))
        self._unmarked.append(step)
        self.poll()

    def poll(self) -> None:
        """Mark the saves that have finished as model directories (non-blocking)."""
        if self._unmarked and not self.manager.is_saving_in_progress():
            self.mark_finished(self._unmarked)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self.mark_finished(self._unmarked)

    def mark_finished(self, steps: list[int]) -> None:
        """Write repo_jax.json into finished step dirs (also those a killed run left unmarked)."""
        finished = set(self.manager.all_steps())
        for step in list(steps):
            step_dir = self.directory / str(step)
            if step in finished and step_dir.is_dir() and jax.process_index() == 0 \
                    and not params_io.is_model_dir(step_dir):
                params_io.write_meta(step_dir, self.model_cfg, {
                    "source": "repo_jax training", "step": step, "scan_layers": self.scan_layers})
        self._unmarked = [s for s in self._unmarked if s not in set(steps)]

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """`abstract_state`: ShapeDtypeStructs with the shardings to restore onto."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                train=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{self.directory / str(step)}: does not match this config "
                              f"({str(e).splitlines()[0][:200]}); resume with the config it was "
                              "written with (run_dir/config.yaml) or use a new run_dir") from None
        meta = dict(out["train"])
        state = TrainState(jax.device_put(abstract_state.step.dtype.type(meta["step"]),
                                          abstract_state.step.sharding),
                           out["params"], out["opt_state"])
        return state, meta

    def close(self) -> None:
        self.wait()
        self.manager.close()
