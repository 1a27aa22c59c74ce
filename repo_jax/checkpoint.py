"""Orbax CheckpointManager wrapper: async saves, keep-last-K, verified resume, any mesh.

Layout: run_dir/checkpoints/<step>/ is one Orbax step with items
  params         flat dict keyed by dotted NNX paths (as `params_io.flat_params`)
  opt_state      the Optax state
  train          JSON: step, data position (samples_seen), seed, batch and data facts
  repo_jax.json  `params_io.write_meta`: each step is a repo-jax model directory, so
                 `repo_jax.load_model(run_dir)`, `convert export` and the generation/eval
                 tools read training output directly
  checksums.json size and CRC-32 of every file above (`step_integrity`)
The last two are written in Orbax's save thread into its temporary step directory, after
the arrays and before the rename that commits the step: a step directory that exists is
complete, marked and checksummed, even if the trainer dies right after.
Restoring takes abstract arrays with the *current* mesh's shardings, so a run can resume
on a different mesh shape; a step that fails its checksums or holds non-finite values is
moved aside (<step>.corrupt-<reason>) and the next older one is tried.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from repo_jax import params_io, step_integrity
from repo_jax.config import CheckpointConfig, ModelConfig
from repo_jax.hf_format import FormatError
from repo_jax.storage import StorageError, fault, silence_fault_echoes
from repo_jax.train.state import TrainState

# Orbax (0.12) writes step N into N + this suffix and renames it when the save commits.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig, model_cfg: ModelConfig,
                 scan_layers: bool, step_metadata: dict[str, Any] | None = None):
        """`step_metadata`: extra facts for each step's repo_jax.json (e.g. optimizer)."""
        self.directory = Path(directory).absolute()
        self.model_cfg, self.scan_layers = model_cfg, scan_layers
        self.step_metadata = step_metadata or {}
        self.primary = jax.process_index() == 0
        self.async_save = cfg.async_save
        self._saving: int | None = None
        silence_fault_echoes()
        # Always Orbax's async checkpointer (it runs the callback that seals a step);
        # async_save=False waits for each save instead.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, create=True, enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("params", "opt_state", "train"))
        except (OSError, ValueError) as e:
            if (reason := fault(e)) is None:
                raise
            raise StorageError(f"cannot write checkpoints in {self.directory}: {reason}; "
                               "free disk space or fix the permissions") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # ---- saving ----------------------------------------------------------------
    def _seal(self) -> None:
        """Orbax's save thread, before the commit rename: mark the step a model directory
        and record its checksums, last."""
        if not self.primary:
            return
        step = self._saving
        step_dir = self.directory / f"{step}{_TMP_SUFFIX}"
        if not step_dir.is_dir():  # storage where Orbax writes in place (no rename)
            step_dir = self.directory / str(step)
        params_io.write_meta(step_dir, self.model_cfg, {
            "source": "repo_jax training", "step": step, "scan_layers": self.scan_layers,
            **self.step_metadata})
        step_integrity.write_manifest(step_dir)

    def save(self, state: TrainState, train_meta: dict[str, Any]) -> None:
        """Start an (async) save of `state`; returns once the arrays are copied off device."""
        self.wait()  # a failed previous save is reported as that step's
        step = int(train_meta["step"])
        self._saving = step
        with self._reporting(step):
            self.manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                train=ocp.args.JsonSave(train_meta)))
        if not self.async_save:
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight has committed (StorageError if it failed)."""
        with self._reporting(self._saving):
            self.manager.wait_until_finished()

    @contextmanager
    def _reporting(self, step: int | None) -> Iterator[None]:
        """A storage fault while saving `step` becomes one StorageError line."""
        try:
            yield
        except (OSError, ValueError) as e:
            if (reason := fault(e)) is None:
                raise
            raise self._failed(step, reason) from None

    def _failed(self, step: int | None, reason: str) -> StorageError:
        # Its temporary directory (still being written by Orbax's other threads) never
        # becomes a step; the next start removes it (cleanup_tmp_directories).
        self._saving = None
        good = [s for s in self.manager.all_steps() if s != step]
        kept = (f"the last good checkpoint, step {max(good)}, is untouched" if good
                else "no checkpoint was saved before")
        return StorageError(f"cannot save checkpoint step {step} in {self.directory}: {reason}; "
                            f"{kept}; free disk space or fix the permissions, then rerun to resume")

    # ---- restoring -------------------------------------------------------------
    def newest_verified(self, log: Callable[[str], None]) -> int | None:
        """The newest step whose checksums verify; newer steps that fail are moved aside
        (process 0 decides, the others follow)."""
        chosen = -1
        if self.primary:
            for step_dir in step_integrity.step_dirs(self.directory):
                try:
                    step_integrity.verify(step_dir)
                except step_integrity.BadStep as e:
                    target = step_integrity.move_aside(step_dir, e.reason)
                    log(f"checkpoint step {step_dir.name} is not usable: {e.detail}; moved to "
                        f"{target}")
                    continue
                chosen = int(step_dir.name)
                break
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            chosen = int(multihost_utils.broadcast_one_to_all(np.int64(chosen)))
        self.manager.reload()
        return None if chosen < 0 else chosen

    def set_aside(self, step: int, bad: step_integrity.BadStep, log: Callable[[str], None]) -> Path:
        """Move step `step` aside (<step>.corrupt-<reason>), saying so in one line."""
        target = self.directory / str(step)
        if self.primary:
            target = step_integrity.move_aside(target, bad.reason)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"repo_jax set aside step {step}")
        self.manager.reload()
        log(f"checkpoint step {step} is not usable: {bad.detail}; moved to {target}")
        return target

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
        try:
            self.wait()
        finally:
            self.manager.close()


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` (sharded arrays) is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves))
