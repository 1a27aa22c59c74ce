"""Lazy, validating safetensors reading (memory-mapped; no torch, bfloat16 included).

The format is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then the bytes. Reading it ourselves lets us memory-map
one tensor at a time and name the exact problem in a truncated or corrupt file.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from repo_jax.hf_format import FormatError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """Tensor names, shapes and lazily mapped arrays of one `.safetensors` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{self.path}: truncated safetensors file (no header); "
                                  "re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise FormatError(f"{self.path}: corrupt safetensors header (length {n} > file "
                                  f"size {size}); re-download or re-save it")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise FormatError(f"{self.path}: corrupt safetensors header (not JSON); "
                                  "re-download or re-save it") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise FormatError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                  f"{e.get('dtype')!r}")
            dtype = np.dtype(DTYPES[e["dtype"]])
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(o) for o in e["data_offsets"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise FormatError(f"{self.path}: tensor {name!r} byte range does not match its "
                                  f"shape {shape}; the file is corrupt")
            if self._data_start + end > size:
                raise FormatError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                  f"{self._data_start + end} but the file has {size}; "
                                  "re-download or re-save it")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """Read-only memory map of one tensor (no copy until used)."""
        dtype, shape, begin, _ = self.entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin,
                         shape=shape)


def hf_safetensors(directory: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Map every tensor name of a HF directory (single file or sharded with index) to
    its file. Raises FormatError naming a missing shard or file."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise FormatError(f"{index}: not a safetensors index (no 'weight_map'); "
                              "re-save the checkpoint") from None
        files: dict[str, SafetensorsFile] = {}
        out: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if shard not in files:
                if not (directory / shard).exists():
                    raise FormatError(f"{index}: names shard {shard!r}, which is missing from "
                                      f"{directory}; copy the shard or fix the index")
                files[shard] = SafetensorsFile(directory / shard)
            if name not in files[shard].entries:
                raise FormatError(f"{index}: says {name!r} is in {shard!r} but it is not; "
                                  "the index and shards are from different checkpoints")
            out[name] = files[shard]
        return out
    if single.exists():
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    raise FormatError(f"{directory}: no model.safetensors or model.safetensors.index.json; "
                      "point at a Hugging Face checkpoint directory")
