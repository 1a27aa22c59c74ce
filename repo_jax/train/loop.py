"""The training loop: config -> mesh/model -> data -> step -> checkpoint/metrics."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repo_jax import params_io
from repo_jax import sharding as shd
from repo_jax.checkpoint import Checkpointer
from repo_jax.cli import check_attention_impl
from repo_jax.config import ConfigError, DistributedConfig, TrainConfig
from repo_jax.data import BatchLoader, Prefetcher, SampleOrder, open_sources
from repo_jax.hf_format import FormatError
from repo_jax.run_lock import RunLock
from repo_jax.step_integrity import BadStep
from repo_jax.storage import writing
from repo_jax.train import flops
from repo_jax.train.build import build
from repo_jax.train.metrics import MetricsLogger
from repo_jax.train.resume import restore_newest_good, step_facts
from repo_jax.train.state import ModelSpec, TrainState, init_params


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where."""


def initialize_distributed(cfg: DistributedConfig) -> None:
    """`jax.distributed.initialize` when the config or JAX_COORDINATOR_ADDRESS asks;
    must run before anything touches the devices. CPU processes use gloo collectives."""
    if not (cfg.enabled or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    kwargs: dict[str, Any] = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def _compilation_cache(cfg: TrainConfig) -> None:
    path = cfg.compilation_cache_dir
    if path == "auto":
        path = str(Path(cfg.run_dir) / "xla_cache")
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class _StopFlag:
    """SIGTERM sets the flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.stop = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, as in library use
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _diverged(ckpt: Checkpointer, loss: float, step: int) -> str:
    """The message for a non-finite loss at `step`. When the newest checkpoint is the step
    just before, its weights produced the non-finite loss: it is set aside (as
    <step>.corrupt-diverged) so that a rerun does not resume from it and diverge again."""
    ckpt.wait()
    newest, moved = ckpt.latest_step(), ""
    if newest is not None and newest == step - 1:
        target = ckpt.set_aside(newest, BadStep("diverged", ""), lambda line: None)
        moved = f"step {newest}, whose weights gave it, was moved to {target}; "
        newest = ckpt.latest_step()
    kept = (f"the last good checkpoint is step {newest} in {ckpt.directory}" if newest is not None
            else "no good checkpoint remains")
    return (f"non-finite loss ({loss}) at step {step}; stopped without saving: {moved}{kept} "
            "(lower optimizer.lr or check the data, then rerun)")


def _init_from_dir(path: str) -> Path:
    model_dir = params_io.resolve_model_dir(path)
    if model_dir is None:
        raise FormatError(f"init_from={path}: not a repo-jax model directory (no repo_jax.json); "
                          "make one with `python -m convert import`")
    return model_dir


def _init_from(path: str, params: dict, spec: ModelSpec, shardings: dict, log) -> dict:
    """Load the parameters a model directory has (sharded); keep the fresh init for the
    rest (RePo maps that plain OLMo-2 lacks) and log exactly which those are."""
    model_dir = _init_from_dir(path)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
              for k, v in spec.abstract.items()}
    loaded = params_io.restore_params(model_dir, target, allow_missing=True)
    fresh = sorted(set(target) - set(loaded))
    log(f"init_from {model_dir}: loaded {len(loaded)} parameters; initialised fresh "
        f"{len(fresh)}: {fresh}")
    return {**params, **loaded}, {"init_from": str(model_dir), "loaded": sorted(loaded), "fresh": fresh}


def run(cfg: TrainConfig, devices: list | None = None) -> dict[str, Any]:
    """Train (or resume) per `cfg` on `devices` (default: all); returns a summary. Raises
    ConfigError / FormatError / DataError for bad input, StorageError when run_dir cannot
    be written and TrainingError when training cannot go on."""
    # Releases the run_dir lock and closes the checkpointer however the run ends.
    with contextlib.ExitStack() as cleanup:
        return _run(cfg, devices, cleanup)


def _run(cfg: TrainConfig, devices: list | None, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir} is a file, not a directory; give a directory "
                          "for the run's checkpoints and logs")
    initialize_distributed(cfg.distributed)
    # Only now: asking for the platform starts JAX's backend, which must follow initialize.
    check_attention_impl(cfg.model.attention_impl, "model.attention_impl=")
    _compilation_cache(cfg)
    main = jax.process_index() == 0

    mesh = shd.make_mesh(cfg.mesh, devices)
    built = build(cfg, mesh)
    spec, tx, p_shard = built.spec, built.tx, built.state_shardings.params

    train_data, eval_data = open_sources(cfg.data)
    batch_sh = shd.batch_sharding(mesh)
    loader = BatchLoader(train_data, SampleOrder(train_data.num_instances, cfg.seed),
                         cfg.grad_accum, cfg.micro_batch_size, batch_sh, cfg.model.vocab_size)
    eval_loader = None if eval_data is None else BatchLoader(
        eval_data, SampleOrder(eval_data.num_instances, cfg.seed, shuffle=False), 1,
        cfg.micro_batch_size, batch_sh, cfg.model.vocab_size)

    # Bad data (e.g. token ids >= vocab) or a bad init_from fail here, before anything is written.
    loader.local(0)
    if cfg.init_from and not (run_dir / "checkpoints").exists():
        _init_from_dir(cfg.init_from)
    # One writer per run_dir (on a pod, process 0 holds it for the job).
    if main:
        cleanup.callback(RunLock(run_dir).release)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, cfg.model, cfg.scan_layers,
                        step_facts(cfg))
    cleanup.callback(ckpt.close)
    messages: list[str] = []
    data_facts = {"seed": cfg.seed, "batch_size": cfg.batch_size,
                  "num_instances": train_data.num_instances, "seq_len": cfg.data.seq_len}
    restored = restore_newest_good(ckpt, cfg, built.abstract_state(), messages.append)
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        changed = {k: (meta.get(k), v) for k, v in data_facts.items() if meta.get(k) != v}
        if changed:
            raise ConfigError(f"{run_dir}: the checkpoint at step {start} was trained with "
                              f"{ {k: a for k, (a, b) in changed.items()} } but this config gives "
                              f"{ {k: b for k, (a, b) in changed.items()} }; resuming would not continue "
                              "the same data stream: restore those values or use a new run_dir")
        samples = int(meta["samples_seen"])
        messages.append(f"resumed from {ckpt.directory / str(start)} (step {start}, "
                        f"{samples} samples seen) on mesh {dict(mesh.shape)}")
    else:
        start, samples = 0, 0
        params = init_params(spec, cfg.seed, p_shard)
        if cfg.init_from:
            params, init_report = _init_from(cfg.init_from, params, spec, p_shard, messages.append)
            if main:
                with writing(str(run_dir / "init_from.json")):
                    (run_dir / "init_from.json").write_text(json.dumps(init_report, indent=1))
        opt_state = jax.jit(tx.init, out_shardings=built.state_shardings.opt_state)(params)
        state = TrainState(jax.device_put(jnp.int32(0), shd.replicated(mesh)), params, opt_state)

    if main:
        import yaml

        with writing(str(run_dir / "config.yaml")):
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    logger = MetricsLogger(run_dir, total_steps=cfg.steps, start_step=start,
                           tensorboard=cfg.tensorboard, progress=cfg.progress, enabled=main)
    if start >= cfg.steps:
        messages.append(f"{run_dir} is already at step {start} of steps={cfg.steps}; raise steps "
                        "to train further or use a new run_dir")
    for m in messages:
        logger.message(m)
    skipped = sorted({f"{k}: {', '.join(d)}" for k, v in spec.abstract.items()
                      if (d := shd.unsharded_dims(spec.logical_axes[k], v.shape, mesh))})
    if skipped:
        logger.message(f"not split (mesh size does not divide): {skipped[:6]}")

    train_step, eval_step = built.train_step, built.eval_step
    total_peak, peak_how = flops.peak_flops(cfg.peak_flops, mesh.devices.size)
    step_flops = flops.flops_per_token(cfg.model, cfg.data.seq_len) * cfg.tokens_per_step
    logger.message(
        f"train: {train_data.description}, {train_data.num_instances} x {cfg.data.seq_len} tokens; "
        f"eval: {eval_data.description if eval_data else 'none'}; mesh {dict(mesh.shape)} on "
        f"{mesh.devices.size} {jax.devices()[0].platform} devices, {jax.process_count()} process(es); "
        f"{cfg.tokens_per_step} tokens/step; peak {total_peak / 1e9:.1f} GFLOP/s ({peak_how})")

    def evaluate() -> dict[str, float]:
        if eval_loader is None:
            return {}
        n = min(cfg.eval_batches, max(1, eval_data.num_instances // cfg.micro_batch_size))
        losses = [float(eval_step(state.params, eval_loader.to_global(
            eval_loader.local(k * cfg.micro_batch_size)))) for k in range(n)]
        loss = float(np.mean(losses))
        return {"eval_loss": loss, "eval_ppl": float(math.exp(min(loss, 80.0)))}

    def save(step: int) -> None:
        ckpt.save(state, {"step": step, "samples_seen": samples, **data_facts})

    prefetch = Prefetcher(loader, cfg.batch_size)
    window_t, window_steps, last = time.perf_counter(), 0, {}
    stopped = False
    try:
        with _StopFlag() as flag:
            for step in range(start + 1, cfg.steps + 1):
                batch = loader.to_global(prefetch.get(samples))
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch)
                metrics = jax.device_get(metrics)
                loss = float(metrics["loss"])
                if not math.isfinite(loss) or not math.isfinite(float(metrics["grad_norm"])):
                    raise TrainingError(_diverged(ckpt, loss, step))
                samples += cfg.batch_size
                if step == start + 1:
                    # The first step compiles; time the rest.
                    window_t, window_steps = time.perf_counter(), 0
                    logger.message(f"step {step} (compile + run): {time.perf_counter() - t0:.1f}s")
                else:
                    window_steps += 1
                logger.step_done()
                record: dict[str, Any] = {}
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_t
                    per_step = elapsed / window_steps if window_steps else float("nan")
                    record = {k: float(v) for k, v in metrics.items()}
                    record.update(tokens_per_sec=cfg.tokens_per_step / per_step if window_steps else None,
                                  mfu=flops.mfu(step_flops, per_step, total_peak) if window_steps else None,
                                  tokens=samples * cfg.data.seq_len)
                    window_t, window_steps = time.perf_counter(), 0
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    record.update(evaluate())
                    window_t = time.perf_counter()
                if record:
                    logger.log(step, record)
                    last = record
                every = cfg.checkpoint.every
                if (every and step % every == 0) or step == cfg.steps or flag.stop:
                    save(step)
                if flag.stop:
                    stopped = True
                    logger.message(f"SIGTERM: saved step {step}, exiting")
                    break
    finally:
        prefetch.close()
        logger.close()
    ckpt.wait()
    final = int(state.step)
    return {"step": final, "stopped": stopped, "last": last, "run_dir": str(run_dir),
            "checkpoint": str(ckpt.directory / str(ckpt.latest_step())) if ckpt.latest_step() else None}
