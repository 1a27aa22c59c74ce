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
import math
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
# Cap on the JSON header, checked before it is read: parsing costs ~15x its size in memory.
# OLMo-2 13B's header is ~60 KB (~400 tensors); 16 MiB allows ~100k tensors. (The safetensors
# library allows 100 MB, which let a forged 66 MB header take ~1 GB here.)
MAX_HEADER_BYTES = 16 * 2**20


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
        try:
            self._read_header()
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read it ({e.strerror or e})") from None

    def _read_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{self.path}: truncated safetensors file (no header); "
                                  "re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            # Checked before reading: a forged length must not make us allocate it.
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{self.path}: safetensors header of {n} bytes exceeds the "
                                  f"{MAX_HEADER_BYTES} byte limit (real checkpoints have headers of a few "
                                  "hundred KB at most); "
                                  "the file is corrupt or not a checkpoint")
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
        if not isinstance(self.metadata, dict):
            raise FormatError(f"{self.path}: corrupt safetensors header (__metadata__ is not "
                              "an object); re-download or re-save it")
        self._data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._entry(name, e, size - self._data_start)
        # The format forbids tensors sharing bytes (the safetensors library refuses it):
        # two parameters read from one range would silently be the same weights.
        spans = sorted((b, e, name) for name, (_, _, b, e) in self.entries.items() if e > b)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise FormatError(f"{self.path}: tensors {first!r} and {second!r} overlap "
                                  "(data_offsets share bytes); the file is corrupt or forged")

    def _entry(self, name: str, e, data_size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, every field type- and
        range-checked before anything is allocated for it."""
        def corrupt(why: str) -> FormatError:
            return FormatError(f"{self.path}: tensor {name!r}: {why}; the file is corrupt, "
                               "re-download or re-save it")

        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise corrupt("header entry lacks dtype, shape or data_offsets")
        dtype_name, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype_name, str):
            raise corrupt(f"dtype {dtype_name!r} is not a string")
        if dtype_name not in DTYPES:
            raise FormatError(f"{self.path}: tensor {name!r} has unsupported dtype "
                              f"{dtype_name!r}; supported: {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise corrupt(f"shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_count(o) for o in offsets)):
            raise corrupt(f"data_offsets {offsets!r} are not two non-negative integers")
        dtype = np.dtype(DTYPES[dtype_name])
        begin, end = offsets
        # Python integers: np.prod would wrap around for a forged huge shape.
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise corrupt(f"byte range {offsets} does not match shape {shape} of {dtype_name}")
        if end > data_size:
            raise FormatError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                              f"{self._data_start + end} but the file has "
                              f"{self._data_start + data_size}; re-download or re-save it")
        return dtype, tuple(shape), begin, end

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


def member(directory: str | os.PathLike, name, what: str) -> Path:
    """`directory / name` for a file name a checkpoint gives (an index's shard, say),
    refused unless it stays inside `directory`: no absolute path, no `..`, and no
    symlink leading out. The one exception is the Hugging Face cache layout, where
    `snapshots/<rev>/` files link to `../../blobs/`. Checked before anything is opened."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FormatError(f"{what}: file name {name!r} is not a file name; fix the index")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise FormatError(f"{what}: file name {name!r} points outside {directory}; a checkpoint "
                          "may only name files inside its own directory")
    root = directory.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    target = (directory / relative).resolve()
    if not any(target == a or a in target.parents for a in allowed):
        raise FormatError(f"{what}: {directory / relative} is a link to {target}, outside "
                          f"{directory}; copy the file into the checkpoint directory")
    return directory / relative


def _sharded(directory: Path, index: Path, opener) -> dict[str, TensorFile]:
    """Name -> file for a `*.index.json` with a `weight_map`."""
    try:
        weight_map = json.loads(member(directory, index.name, str(index)).read_bytes()
                                ).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index}: not a checkpoint index (no 'weight_map' object); "
                          "re-save the checkpoint")
    files: dict[str, TensorFile] = {}
    out: dict[str, TensorFile] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FormatError(f"{index}: weight_map[{name!r}] is {shard!r}, not a shard file "
                              "name; fix the index")
        if shard not in files:
            path = member(directory, shard, str(index))
            if not path.is_file():
                raise FormatError(f"{index}: names shard {shard!r}, which is missing from "
                                  f"{directory}; copy the shard or fix the index")
            files[shard] = opener(path)
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
        f = opener(member(directory, filename, str(directory)))
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
