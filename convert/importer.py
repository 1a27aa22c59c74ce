"""`convert import`: a Hugging Face or OLMo checkpoint -> a repo-jax model directory.

Every check that needs only headers (config, names, shapes) runs before anything is
written. Then each tensor goes through in row blocks: read (HF layout) -> check
finite -> cast -> transpose to Flax [in, out] -> write, so memory holds a few
blocks, never the model.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert import layout
from convert.staging import check_destination, staged
from repo_jax import params_io
from repo_jax.config import ModelConfig
from repo_jax.hf_format import FormatError, hf_to_path, path_to_hf
from repo_jax.sources import Source, open_source

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DTYPES = tuple(NP_DTYPES)


@dataclass(frozen=True)
class Item:
    """One tensor to convert: source name, parameter key, whether it is transposed,
    and its shape in our layout."""
    name: str
    key: str
    transpose: bool
    shape: tuple[int, ...]


def is_model_dir(path: Path) -> bool:
    """A repo-jax model directory, which `--overwrite` may replace: its
    repo_jax.json says so."""
    try:
        return json.loads((path / params_io.META_FILE).read_bytes()).get("format") == \
            params_io.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def default_dtype(source: Source) -> str:
    """Keep the source's dtype when all its tensors share a supported one (so a round
    trip is exact by default); otherwise float32."""
    found = {source.dtype(n).name for n in source.names}
    return found.pop() if len(found) == 1 and found <= set(DTYPES) else "float32"


def plan(source: Source, cfg: ModelConfig) -> list[Item]:
    """Match the source's tensors to the model's parameters, by name and shape, in
    model order. Raises FormatError for an unexpected, missing or misshapen tensor."""
    expected = layout.expected_params(cfg)
    items: dict[str, Item] = {}
    for name in source.names:
        try:
            path, transpose = hf_to_path(name)
        except FormatError as e:
            raise FormatError(f"{source.file_of(name)}: {e}; remove it or use the matching "
                              "checkpoint") from None
        key = params_io.path_key(path)
        if key not in expected:
            raise FormatError(f"{source.file_of(name)}: unexpected tensor {source.label(name)} for "
                              f"this config "
                              f"({cfg.num_hidden_layers} layers, RePo on {list(cfg.repo_layers)}, "
                              f"tied embeddings {cfg.tie_word_embeddings}); remove it or fix the "
                              "config")
        shape = source.shape(name)
        ours = shape[::-1] if transpose else shape
        want = expected[key][1]
        if ours != want:
            hf_want = want[::-1] if transpose else want
            raise FormatError(f"{source.file_of(name)}: tensor {source.label(name)} has shape "
                              f"{shape}, the config needs {hf_want}; the weights and config "
                              "disagree")
        items[key] = Item(name, key, transpose, want)
    missing = [k for k in expected if k not in items]
    if missing:
        names = sorted({source.file_name(path_to_hf(expected[k][0])[0]) for k in missing})
        raise FormatError(f"{source.path}: missing tensor(s) {names[:4]}"
                          f"{f' and {len(names) - 4} more' if len(names) > 4 else ''}; the "
                          "checkpoint is incomplete or does not match its config")
    return [items[k] for k in expected]


def _blocks(source: Source, item: Item, dtype: np.dtype, rows: int,
            bar: tqdm) -> Iterator[np.ndarray]:
    total = source.shape(item.name)[0] if item.shape else 1
    for start in range(0, total, rows):
        block = source.read(item.name, start, min(start + rows, total))
        layout.check_finite(block, f"{source.file_of(item.name)}: tensor {source.label(item.name)}",
                            start)
        block = block.astype(dtype, copy=False)
        bar.update(block.nbytes)
        yield layout.transpose(block) if item.transpose else block


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
                      *, overwrite: bool = False, verify: bool = False, atol: float | None = None,
                      block_bytes: int = layout.BLOCK_BYTES, log=print) -> dict:
    """Convert `src` into the model directory `dst`; returns a summary (and the
    verification figures with `verify`). Raises FormatError (or verify.VerifyError)
    with nothing written."""
    if atol is not None and not (math.isfinite(atol) and atol > 0):
        raise FormatError(f"--atol {atol}: must be a positive number")
    check_destination(dst, overwrite, src, replaceable=is_model_dir,
                      kind="repo-jax model directory")
    source = open_source(src)
    if dtype is not None and dtype not in DTYPES:
        raise FormatError(f"--dtype {dtype!r}: use one of {DTYPES}")
    dtype = dtype or default_dtype(source)
    cfg = source.config.replace(param_dtype=dtype, dtype=dtype)
    items = plan(source, cfg)
    np_dtype = NP_DTYPES[dtype]
    total = sum(int(np.prod(i.shape, dtype=np.int64)) * np_dtype.itemsize for i in items)
    started = time.perf_counter()
    summary = {"source": str(Path(src).absolute()), "source_format": source.kind,
               "dtype": dtype, "tensors": len(items), "bytes": total}
    with staged(dst, overwrite, log) as tmp:
        writer = params_io.ParamsWriter(tmp)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="import",
                  disable=None, dynamic_ncols=True) as bar:
            for n, item in enumerate(items, 1):
                bar.set_postfix_str(f"tensor {n}/{len(items)}", refresh=False)
                src_shape = source.shape(item.name)
                itemsize = max(np_dtype.itemsize, source.dtype(item.name).itemsize)
                rows = layout.block_rows(src_shape, itemsize, block_bytes)
                blocks = _blocks(source, item, np_dtype, rows, bar)
                writer.write(item.key, item.shape, np_dtype, blocks,
                             axis=1 if item.transpose else 0, block_rows=rows)
        writer.close()
        summary["seconds"] = time.perf_counter() - started
        params_io.write_meta(tmp, cfg, {"source": summary["source"],
                                        "source_format": source.kind, "dtype": dtype,
                                        "converted_by": "python -m convert import"})
        log(f"imported {len(items)} tensors, {total / 1e6:.1f} MB ({dtype}) from {src} "
            f"[{source.kind}] in {summary['seconds']:.1f} s; RePo layers {list(cfg.repo_layers)}")
        if verify:
            from convert.verify import verify_conversion

            summary["verify"] = verify_conversion(source, tmp, atol=atol, log=log)
    return summary
