"""The repo-jax model checkpoint: Orbax parameters plus the model config.

Layout of a model directory (written by `convert import`, read by `load_model`,
`init_from=` in training and `convert export`):

    DIR/repo_jax.json   {"format": "repo-jax-model", "version": 1,
                         "model_config": {...ModelConfig fields...},
                         "metadata": {"source", "source_format", "dtype",
                                      "repo_layers", "scan_layers", ...}}
    DIR/params/         Orbax (StandardCheckpointer) flat dict:
                        "layers.3.self_attn.q_proj.kernel" -> array ([in, out])

Keys are the dotted NNX parameter paths, so the parameter tree is the same for
scanned and unscanned execution; `scan_layers` is recorded for information only.

Two writers make the same `params/`: `save_params` hands a whole (possibly sharded)
tree to Orbax, which is what training does; `ParamsWriter` writes one tensor, one
block of rows at a time, so converting a checkpoint never holds the model in memory.
It uses tensorstore directly in the layout Orbax itself writes and restores (an OCDBT
key-value store of zarr arrays named by the keys, plus the `_METADATA` tree). Both
are read back by `restore_params` (Orbax) and, block by block, by `ParamsReader`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import nnx

from repo_jax import step_integrity
from repo_jax.config import ConfigError, ModelConfig
from repo_jax.hf_format import FormatError
from repo_jax.storage import silence_fault_echoes

FORMAT = "repo-jax-model"
META_FILE = "repo_jax.json"
PARAMS_DIR = "params"


def path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, Any]:
    """Dotted parameter path -> array (or ShapeDtypeStruct for an abstract model)."""
    return {path_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def is_model_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / META_FILE).exists()


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def resolve_model_dir(path: str | os.PathLike, log: Callable[[str], None] = _warn) -> Path | None:
    """`path` itself if it is a model directory; for a training run directory
    (`run_dir/checkpoints/<step>/`) its newest step whose parameters verify against the
    step's checksums (`step_integrity`), logging each newer step skipped and why; else
    None. A training step named explicitly that fails verification is refused."""
    path = Path(path)
    if is_model_dir(path):
        if step_integrity.is_training_step(path):
            try:
                step_integrity.verify(path, ("params",))
            except step_integrity.BadStep as e:
                raise FormatError(f"{path}: checkpoint step fails verification ({e.detail}); do "
                                  "not use it: give the run directory to take its newest good "
                                  "step") from None
        return path
    for root in (path / "checkpoints", path):
        bad = []
        for step_dir in step_integrity.step_dirs(root):
            try:
                step_integrity.verify(step_dir, ("params",))
            except step_integrity.BadStep as e:
                bad.append(f"step {step_dir.name} ({e.detail})")
                continue
            if bad:
                log(f"{root}: skipped {'; '.join(bad)}; using step {step_dir.name}")
            return step_dir
        if bad:
            raise FormatError(f"{root}: no checkpoint step verifies: {'; '.join(bad)}; the run "
                              "has no usable checkpoint")
    return None


def write_meta(directory: str | os.PathLike, cfg: ModelConfig, metadata: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": 1, "model_config": cfg.to_dict(),
            "metadata": {"repo_layers": list(cfg.repo_layers), "scan_layers": False, **metadata}}
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and metadata of a model directory."""
    f = Path(directory) / META_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise FormatError(f"{f}: not found; {directory} is not a repo-jax model directory "
                          "(make one with `python -m convert import`)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{f}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise FormatError(f"{f}: not UTF-8 text; the model directory is damaged") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{f}: not a JSON object; the model directory is damaged")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{f}: format={meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise FormatError(f"{f}: bad model_config ({e})") from None
    metadata = meta.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FormatError(f"{f}: metadata is a {type(metadata).__name__}, not a JSON object; the "
                          "model directory is damaged")
    recorded = metadata.get("repo_layers")
    if recorded is not None and (not isinstance(recorded, list)
                                 or not all(isinstance(i, int) for i in recorded)):
        raise FormatError(f"{f}: metadata.repo_layers={recorded!r} is not a list of layer "
                          "numbers; the model directory is damaged")
    if recorded is not None and tuple(recorded) != cfg.repo_layers:
        raise FormatError(f"{f}: metadata says RePo layers {recorded} but model_config has "
                          f"{list(cfg.repo_layers)}; the file was edited inconsistently")
    return cfg, metadata


def save_params(directory: str | os.PathLike, params: dict[str, Any]) -> None:
    """Write a flat parameter dict to DIR/params (blocking)."""
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(Path(directory).absolute() / PARAMS_DIR, params)
    ckpt.wait_until_finished()


def saved_shapes(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the saved parameters, read from metadata only."""
    import orbax.checkpoint as ocp

    # The handler, not a Checkpointer: inside a training step directory the params item
    # has no step-level metadata of its own, and a Checkpointer would warn about it.
    try:
        tree = ocp.StandardCheckpointHandler().metadata(Path(directory).absolute() / PARAMS_DIR).tree
    except (OSError, ValueError) as e:
        raise _damaged(directory, e) from None
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tree.items()}


def restore_params(directory: str | os.PathLike, target: dict[str, Any],
                   allow_missing: bool = False) -> dict[str, jax.Array]:
    """Restore the keys of `target` (ShapeDtypeStructs, optionally with `.sharding`, so
    each host reads only its shards). Keys and shapes must match the checkpoint; dtypes
    are cast to the target's. With `allow_missing`, target keys the checkpoint lacks
    (e.g. RePo maps when starting from plain OLMo-2) are left out of the result."""
    import orbax.checkpoint as ocp

    saved = saved_shapes(directory)
    missing = sorted(set(target) - set(saved))
    extra = sorted(set(saved) - set(target))
    if allow_missing:
        target = {k: v for k, v in target.items() if k in saved}
        missing = []
    if missing or extra:
        raise FormatError(f"{directory}: parameters do not match the model: missing "
                          f"{missing[:5]}, unexpected {extra[:5]}; use the config the checkpoint "
                          "was written with")
    for k, t in target.items():
        if saved[k][0] != tuple(t.shape):
            raise FormatError(f"{directory}: parameter {k!r} has shape {saved[k][0]}, the model "
                              f"expects {tuple(t.shape)}")
    # A target without a sharding goes to this process's first device: the shardings
    # recorded in the checkpoint name the devices of the run that wrote it (e.g. a
    # multi-host training job), which need not exist here.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {k: t if getattr(t, "sharding", None) is not None
              else jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=local) for k, t in target.items()}
    try:
        return ocp.StandardCheckpointHandler().restore(Path(directory).absolute() / PARAMS_DIR,
                                                       args=ocp.args.StandardRestore(target))
    except (OSError, ValueError) as e:  # tensorstore reports a truncated file as ValueError
        raise _damaged(directory, e) from None


def _damaged(directory: str | os.PathLike, e: Exception) -> FormatError:
    silence_fault_echoes()  # the failed read's sibling reads, reported here once
    return FormatError(f"{directory}: cannot read the saved parameters "
                       f"({str(e).splitlines()[0][:300] if str(e) else type(e).__name__}); "
                       "the checkpoint is damaged")


def load_model_dir(directory: str | os.PathLike, dtype: str | None = None, **overrides) -> nnx.Module:
    """Build the model of a repo-jax model directory with its saved parameters."""
    from repo_jax.loading import abstract_model

    cfg, _ = read_meta(directory)
    if dtype is not None:
        overrides = {"param_dtype": dtype, "dtype": dtype, **overrides}
    cfg = cfg.replace(**overrides) if overrides else cfg
    model = abstract_model(cfg)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_params(model).items()}
    values = restore_params(directory, target)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        var.set_value(values[path_key(path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- streaming access to DIR/params ------------------------------------------------
_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


def _zarr_dtype(dtype: np.dtype) -> str:
    # zarr v2 has no bfloat16; tensorstore (and so Orbax) spells it like this.
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


class ParamsWriter:
    """Writes DIR/params tensor by tensor, each from an iterator of row blocks.

    Each array is chunked by the blocks it is written in, and a block is written
    while the next one is read, so memory holds about two blocks. `close()` writes
    the metadata that makes the directory an Orbax checkpoint."""

    def __init__(self, directory: str | os.PathLike):
        import tensorstore as ts

        self._ts = ts
        self.path = Path(directory).absolute() / PARAMS_DIR
        self.path.mkdir(parents=True)
        self._kvstore = {"driver": "ocdbt", "base": f"file://{self.path}/"}
        # No fsync per write (it halves throughput); close() syncs everything once.
        self._context = ts.Context({"file_io_sync": False})
        self._tree: dict[str, Any] = {}
        self._started = time.time_ns()

    def write(self, key: str, shape: tuple[int, ...], dtype: Any, blocks: Iterable[np.ndarray],
              axis: int = 0, block_rows: int | None = None) -> None:
        """Write parameter `key` from consecutive slabs along `axis`, each
        `block_rows` thick (the last may be thinner)."""
        if key in self._tree:
            raise ValueError(f"parameter {key!r} written twice")
        dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        chunks = list(shape)
        if shape:
            chunks[axis] = max(1, min(block_rows or shape[axis], shape[axis]))
        array = self._ts.open({
            "driver": "zarr", "kvstore": {**self._kvstore, "path": key},
            # Weights hardly compress; skipping it keeps conversion at disk speed.
            "metadata": {"shape": list(shape), "chunks": chunks, "dtype": _zarr_dtype(dtype),
                         "compressor": None},
            "create": True}, context=self._context).result()
        done, pending = 0, None
        for block in blocks:
            rows = block.shape[axis] if shape else 1
            index = tuple(slice(done, done + rows) if d == axis else slice(None)
                          for d in range(len(shape)))
            if block.shape != tuple(rows if d == axis else n for d, n in enumerate(shape)):
                raise ValueError(f"parameter {key!r}: block of shape {block.shape} does not fit "
                                 f"{shape} at row {done}")
            if pending is not None:
                pending[0].result()
            # Keep the block referenced until tensorstore has written it.
            pending = (array[index].write(np.asarray(block, dtype)), block)
            done += rows
        if pending is not None:
            pending[0].result()
        if done != (shape[axis] if shape else 1):
            raise ValueError(f"parameter {key!r}: got {done} rows of {shape}")
        self._tree[str((key,))] = {
            "key_metadata": [{"key": key, "key_type": 2}],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": list(shape)}}

    def close(self) -> None:
        """Write the metadata Orbax reads (the same files StandardCheckpointer writes)
        and make everything durable."""
        meta = {"tree_metadata": self._tree, "use_ocdbt": True, "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.path / "_METADATA").write_text(json.dumps(meta))
        (self.path / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": _HANDLER, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": self._started, "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {}}))
        for root, _, files in os.walk(self.path):
            for name in [*files, "."]:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


class ParamsReader:
    """Reads arrays of DIR/params a block at a time, whichever writer made it."""

    def __init__(self, directory: str | os.PathLike):
        import tensorstore as ts

        self._ts = ts
        self.path = Path(directory).absolute() / PARAMS_DIR
        f = self.path / "_METADATA"
        try:
            meta = json.loads(f.read_text())
            entries = meta["tree_metadata"].values()
            self._keys = [e["key_metadata"][0]["key"] for e in entries
                          if len(e["key_metadata"]) == 1]
        except FileNotFoundError:
            raise FormatError(f"{f}: not found; {directory} has no saved parameters") from None
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError):
            raise FormatError(f"{f}: not Orbax parameter metadata; the checkpoint is "
                              "damaged") from None
        if len(self._keys) != len(meta["tree_metadata"]):
            raise FormatError(f"{f}: parameters are not a flat dict of dotted paths; not a "
                              "repo-jax model directory")
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        if meta.get("use_ocdbt", True):
            self._spec = lambda k: {"driver": driver, "kvstore": {
                "driver": "ocdbt", "base": f"file://{self.path}/", "path": k}}
        else:
            self._spec = lambda k: {"driver": driver,
                                    "kvstore": {"driver": "file", "path": f"{self.path}/{k}"}}
        self._context = ts.Context()
        self._open: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self._keys)

    def array(self, key: str):
        """The tensorstore array of `key` (opened once; reading it reads the disk)."""
        if key not in self._open:
            try:
                self._open[key] = self._ts.open(self._spec(key), open=True, read=True,
                                                context=self._context).result()
            except ValueError as e:
                silence_fault_echoes()
                raise FormatError(f"{self.path}: cannot open parameter {key!r} "
                                  f"({str(e).splitlines()[0]}); the checkpoint is "
                                  "damaged") from None
        return self._open[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.array(key).domain.shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self.array(key).dtype.numpy_dtype)

    def chunk_rows(self, key: str, axis: int) -> int:
        """Extent of one stored chunk along `axis` (reads aligned to it touch no chunk twice)."""
        return int(self.array(key).chunk_layout.read_chunk.shape[axis])

    def read(self, key: str, axis: int = 0, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) along `axis` of parameter `key`."""
        array = self.array(key)
        index = tuple(slice(start, stop) if d == axis else slice(None) for d in range(array.rank))
        try:
            return np.asarray(array[index].read().result())
        except (OSError, ValueError) as e:
            silence_fault_echoes()
            raise FormatError(f"{self.path}: cannot read parameter {key!r} "
                              f"({str(e).splitlines()[0][:300]}); the checkpoint is damaged") from None
