"""What both directions share: the parameters a config needs, and row blocks."""
from __future__ import annotations

import numpy as np
from flax import nnx

from repo_jax.config import ModelConfig
from repo_jax.hf_format import FormatError
from repo_jax.loading import abstract_model
from repo_jax.params_io import path_key

# Rows are read, transformed and written in blocks of about this many bytes.
BLOCK_BYTES = 16 << 20


def expected_params(cfg: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Dotted key -> (NNX path, shape [Flax layout]) of every parameter, in model order."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return {path_key(p): (p, tuple(v.get_value().shape)) for p, v in nnx.to_flat_state(state)}


def block_rows(shape: tuple[int, ...], itemsize: int, block_bytes: int = BLOCK_BYTES,
               align: int = 1) -> int:
    """Rows (along axis 0 of `shape`) per block: about `block_bytes`, at least one,
    a multiple of `align` (a stored chunk) when that is more than one row."""
    if not shape:
        return 1
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = max(1, block_bytes // row)
    if align > 1:
        rows = max(align, rows // align * align)
    return min(rows, shape[0]) if shape[0] else 1


def transpose(block: np.ndarray, tile: int = 256) -> np.ndarray:
    """`block.T` as a C-contiguous array, copied tile by tile: a plain `.T.copy()`
    strides through memory and runs several times slower on large blocks."""
    if block.ndim != 2:
        return np.ascontiguousarray(block.T)
    rows, cols = block.shape
    out = np.empty((cols, rows), block.dtype)
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            out[j:j + tile, i:i + tile] = block[i:i + tile, j:j + tile].T
    return out


def check_finite(block: np.ndarray, what: str, first_row: int) -> None:
    """Refuse NaN or Inf, naming the tensor and the row."""
    if block.dtype.kind == "f" or block.dtype.name == "bfloat16":
        # Fast path: NaN and Inf make the sum non-finite; only a non-finite sum
        # (which a huge but finite tensor can also give) needs the exact check.
        if np.isfinite(block.sum(dtype=np.float32)):
            return
        bad = ~np.isfinite(block)
        if bad.any():
            row = first_row + int(np.argwhere(bad)[0][0])
            raise FormatError(f"{what}: contains NaN or Inf (row {row}); the checkpoint is "
                              "damaged, use an earlier one")
