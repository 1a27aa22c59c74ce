"""`convert export`: a repo-jax model directory (or a training run's latest
checkpoint) -> a Hugging Face directory: config.json plus sharded safetensors and
their index, written one row block at a time.

Plain models load in upstream `transformers`. `pe_config` says the mode ('none',
'nope' or RePo's 'swigluex_multihead') with the start layer and layer ids under both
spellings, equal, so that the authors' code reads what the model is; a model it cannot
express (RePo and NoPE layers together) is exported with a note saying what their
code will run instead.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convert import layout
from convert.importer import DTYPES, NP_DTYPES
from convert.staging import check_destination, staged
from repo_jax import params_io
from repo_jax.hf_format import FormatError, config_to_hf, path_to_hf
from repo_jax.pe_config import export_note
from repo_jax.safetensors_io import SafetensorsWriter

DEFAULT_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as in transformers; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise FormatError(f"--shard-size {text!r}: use a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Group tensor indices in order into shards of at most `limit` bytes (a larger
    tensor gets a shard of its own), as transformers' save_pretrained does."""
    out: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if out[-1] and used + size > limit:
            out.append([])
            used = 0
        out[-1].append(i)
        used += size
    return out


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face checkpoint directory, which `--overwrite` may replace: a
    config.json naming a model_type, and safetensors or pytorch_model weights."""
    try:
        config = json.loads((path / "config.json").read_bytes())
    except (OSError, ValueError):
        return False
    weights = [*path.glob("model*.safetensors*"), *path.glob("pytorch_model*.bin*")]
    return isinstance(config, dict) and "model_type" in config and bool(weights)


def export_model(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, *,
                 shard_size: str | int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                 block_bytes: int = layout.BLOCK_BYTES, log=print) -> dict:
    """Write the HF directory `dst` from the model (or run) directory `src`."""
    limit = shard_size if isinstance(shard_size, int) else parse_size(shard_size)
    check_destination(dst, overwrite, src, replaceable=is_hf_dir,
                      kind="Hugging Face checkpoint directory")
    model_dir = params_io.resolve_model_dir(src)
    if model_dir is None:
        raise FormatError(f"{src}: not a repo-jax model directory (no {params_io.META_FILE}) nor "
                          "a training run with checkpoints/<step>/; make one with "
                          "`python -m convert import`")
    cfg, _ = params_io.read_meta(model_dir)
    if dtype is not None and dtype not in DTYPES:
        raise FormatError(f"--dtype {dtype!r}: use one of {DTYPES}")
    dtype = dtype or cfg.param_dtype
    np_dtype = NP_DTYPES[dtype]
    hf_config = config_to_hf(cfg.replace(param_dtype=dtype))
    reader = params_io.ParamsReader(model_dir)
    expected = layout.expected_params(cfg)
    saved = set(reader.keys())
    missing, extra = [k for k in expected if k not in saved], sorted(saved - set(expected))
    if missing or extra:
        raise FormatError(f"{model_dir}: saved parameters do not match its config: missing "
                          f"{missing[:4]}, unexpected {extra[:4]}; the checkpoint is damaged")
    tensors = []  # (HF name, key, transpose, HF shape)
    for key, (path, shape) in expected.items():
        if reader.shape(key) != shape:
            raise FormatError(f"{model_dir}: parameter {key!r} has shape {reader.shape(key)}, its "
                              f"config needs {shape}; the checkpoint is damaged")
        name, transpose = path_to_hf(path)
        tensors.append((name, key, transpose, shape[::-1] if transpose else shape))
    sizes = [int(np.prod(t[3], dtype=np.int64)) * np_dtype.itemsize for t in tensors]
    groups = shards(sizes, limit)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
    started = time.perf_counter()
    with staged(dst, overwrite, log) as tmp, \
            tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc="export",
                 disable=None, dynamic_ncols=True) as bar:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        weight_map = {}
        for file, group in zip(files, groups):
            writer = SafetensorsWriter(tmp / file, [(tensors[i][0], np_dtype, tensors[i][3])
                                                    for i in group], metadata={"format": "pt"})
            for i in group:
                name, key, transpose, hf_shape = tensors[i]
                bar.set_postfix_str(f"tensor {i + 1}/{len(tensors)}", refresh=False)
                axis = 1 if transpose else 0
                itemsize = max(np_dtype.itemsize, reader.dtype(key).itemsize)
                align = reader.chunk_rows(key, axis) if hf_shape else 1
                rows = layout.block_rows(hf_shape, itemsize, block_bytes, align=align)
                total = hf_shape[0] if hf_shape else 1
                for start in range(0, total, rows):
                    block = reader.read(key, axis, start, min(start + rows, total))
                    block = layout.transpose(block) if transpose else block
                    layout.check_finite(block, f"{model_dir}: parameter {key!r}", start)
                    writer.write(name, block.astype(np_dtype, copy=False))
                    bar.update(block.size * np_dtype.itemsize)
                weight_map[name] = file
            writer.close()
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    seconds = time.perf_counter() - started
    log(f"exported {len(tensors)} tensors, {sum(sizes) / 1e6:.1f} MB ({dtype}) from {model_dir} to "
        f"{dst} in {len(files)} file(s) in {seconds:.1f} s")
    note = export_note(cfg.layer_schemes)
    if note:
        log(f"note: {note}")
    return {"model_dir": str(model_dir), "files": files, "bytes": sum(sizes), "seconds": seconds,
            "dtype": dtype, "note": note}

