"""Tensor files, read and written one block of rows at a time.

- `SafetensorsFile`: a validating safetensors reader (no torch, bfloat16 included).
  The format is an 8-byte little-endian header length, a JSON header mapping names
  to {dtype, shape, data_offsets}, then the bytes. Reading it ourselves lets us name
  the exact problem in a truncated or corrupt file and read row ranges with plain
  file reads, so memory holds one block, not a mapped tensor.
- `TorchFile`: a legacy `pytorch_model.bin` / OLMo `model.pt`, opened only with
  `torch.load(mmap=True, weights_only=True)`: a pickle that would run code is refused.
- `SafetensorsWriter`: writes a safetensors file whose tensors arrive in row blocks.
- `hf_safetensors` / `hf_torch_bins`: every tensor name of a HF directory -> its file.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Iterable, Protocol

import ml_dtypes
import numpy as np

from repo_jax.hf_format import FormatError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class TensorFile(Protocol):
    """What the checkpoint readers need from a file of named tensors."""

    path: Path

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) along axis 0, as a new array."""


class SafetensorsFile:
    """Tensor names, shapes and row-range reads of one `.safetensors` file."""

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
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: corrupt safetensors header (not a JSON object); "
                              "re-download or re-save it")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype_name, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
                shape, begin, end = tuple(int(s) for s in shape), int(begin), int(end)
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{self.path}: corrupt safetensors header entry for {name!r}; "
                                  "re-download or re-save it") from None
            if dtype_name not in DTYPES:
                raise FormatError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                  f"{dtype_name!r}")
            dtype = np.dtype(DTYPES[dtype_name])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
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

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        dtype, shape, begin, _ = self.entries[name]
        if not shape:
            start, stop, row = 0, 1, ()
        else:
            stop = shape[0] if stop is None else stop
            row = shape[1:]
        row_bytes = int(np.prod(row, dtype=np.int64)) * dtype.itemsize
        out = np.empty((stop - start, *row), dtype)
        want = out.nbytes
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin + start * row_bytes)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8))) if want else 0
        if got != want:
            raise FormatError(f"{self.path}: truncated while reading {name!r}; re-download or "
                              "re-save it")
        return out.reshape(shape) if not shape else out


class TorchFile:
    """A torch zip checkpoint (state dict of tensors), memory-mapped. Tensors are
    copied out one row range at a time."""

    def __init__(self, path: str | os.PathLike):
        import torch  # only for .bin / .pt checkpoints; never a dependency of the model

        self.path = Path(path)
        try:
            sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            why = f"it would call {found.group(1)}" if found else str(e).splitlines()[0][:120]
            raise FormatError(f"{self.path}: refused to unpickle: {why}, and a pickle that holds "
                              "more than plain tensors can run code; convert it to safetensors "
                              "where it came from, if you trust that source") from None
        except RuntimeError as e:
            first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
            hint = ("re-save it with a current torch.save" if "mmap can only be used" in first
                    else "re-download or re-save it")
            raise FormatError(f"{self.path}: not a readable torch zip checkpoint ({first}); "
                              f"{hint}") from None
        except (EOFError, OSError, ValueError) as e:
            raise FormatError(f"{self.path}: corrupt torch checkpoint ({e}); re-download or "
                              "re-save it") from None
        if not isinstance(sd, dict):
            raise FormatError(f"{self.path}: holds a {type(sd).__name__}, not a state dict of "
                              "tensors")
        bad = [k for k, v in sd.items()
               if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise FormatError(f"{self.path}: entry {bad[0]!r} is not a named tensor; expected a "
                              "flat state dict")
        self._tensors = sd

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        import torch

        t = self._tensors[name]
        if t.dtype == torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        import torch

        t = self._tensors[name]
        if t.dim():
            t = t[start:stop]
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
        return t.contiguous().numpy().copy()


def _sharded(directory: Path, index: Path, opener) -> dict[str, TensorFile]:
    """Name -> file for a `*.index.json` with a `weight_map`."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index}: not a checkpoint index (no 'weight_map'); "
                          "re-save the checkpoint")
    files: dict[str, TensorFile] = {}
    out: dict[str, TensorFile] = {}
    for name, shard in weight_map.items():
        if shard not in files:
            if not (directory / shard).is_file():
                raise FormatError(f"{index}: names shard {shard!r}, which is missing from "
                                  f"{directory}; copy the shard or fix the index")
            files[shard] = opener(directory / shard)
        if name not in files[shard].keys():
            raise FormatError(f"{index}: says {name!r} is in {shard!r} but it is not; "
                              "the index and shards are from different checkpoints")
        out[name] = files[shard]
    return out


def _hf_weights(directory: str | os.PathLike, filename: str, opener):
    """Tensor name -> open file for `filename` or its sharded form (`filename.index.json`)."""
    directory = Path(directory)
    index = directory / f"{filename}.index.json"
    if index.exists():
        return _sharded(directory, index, opener)
    single = directory / filename
    if single.exists():
        f = opener(single)
        return {name: f for name in f.keys()}
    raise FormatError(f"{directory}: no {filename} or {filename}.index.json; "
                      "point at a Hugging Face checkpoint directory")


def hf_safetensors(directory: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Map every tensor name of a HF directory (single file or sharded with index) to
    its file. Raises FormatError naming a missing shard or file."""
    return _hf_weights(directory, "model.safetensors", SafetensorsFile)


def hf_torch_bins(directory: str | os.PathLike) -> dict[str, TorchFile]:
    """Like `hf_safetensors` for legacy `pytorch_model.bin` (single or sharded)."""
    return _hf_weights(directory, "pytorch_model.bin", TorchFile)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors, declared up front, then arrive in
    order as row blocks. The header comes first, so nothing is buffered."""

    def __init__(self, path: str | os.PathLike,
                 tensors: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in tensors:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors does
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0          # index into _order of the tensor being written
        self._written = 0       # bytes of it written so far

    def write(self, name: str, block: np.ndarray) -> None:
        """Append the next rows of tensor `name` (C order, any number of rows)."""
        want, nbytes = self._order[self._next] if self._next < len(self._order) else (None, 0)
        if name != want:
            raise ValueError(f"{self.path}: got rows of {name!r} but {want!r} comes next")
        block = np.ascontiguousarray(block)
        self._file.write(memoryview(block.reshape(-1).view(np.uint8)))
        self._written += block.nbytes
        if self._written > nbytes:
            raise ValueError(f"{self.path}: more bytes for {name!r} than its shape holds")
        if self._written == nbytes:
            self._next, self._written = self._next + 1, 0

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: closed before {self._order[self._next][0]!r} was "
                             "written completely")
