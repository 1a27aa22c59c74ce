"""Checkpoint directories seen as Hugging Face-named tensors, read in row blocks.

`open_source(path)` tells the layout from the directory's contents:

    Hugging Face   config.json + model.safetensors | model.safetensors.index.json
                   | pytorch_model.bin | pytorch_model.bin.index.json
    OLMo training  config.yaml + model.safetensors | model.pt

and returns a `Source`: the `ModelConfig` (with the RePo layers the weights have),
the HF tensor names, and `read(name, start, stop)` giving rows of a tensor in HF
layout. A fused OLMo tensor appears as its HF parts, each a row range of it, so
nothing is copied until a block is read. `load_model` and `convert import` both
read through here.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from repo_jax import olmo_format
from repo_jax.config import ModelConfig
from repo_jax.hf_format import FormatError, config_from_hf
from repo_jax.safetensors_io import (SafetensorsFile, TensorFile, TorchFile, hf_safetensors,
                                     hf_torch_bins, member)

_REPO_KEY = re.compile(r"layers\.(\d+)\.self_attn\.(gate_map|content_map|final_map)\.weight$")
_LAYER_KEY = re.compile(r"^(?:model\.layers|transformer\.blocks)\.(\d+)\.")


def repo_layers_in(keys: Iterable[str]) -> tuple[int, ...]:
    """The layers whose RePo maps appear among HF tensor names."""
    return tuple(sorted({int(m.group(1)) for k in keys if (m := _REPO_KEY.search(k))}))


@dataclass(frozen=True)
class _Slot:
    """Where a HF tensor lives: rows [start, stop) of `key` in `file` (stop None: all)."""
    file: TensorFile
    key: str
    start: int = 0
    stop: int | None = None


class Source:
    """A checkpoint as HF-named tensors. `kind` is one of hf-safetensors, hf-bin,
    olmo-safetensors, olmo-pt."""

    def __init__(self, path: Path, kind: str, config: ModelConfig, slots: dict[str, _Slot]):
        self.path, self.kind, self.config, self._slots = path, kind, config, slots

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def shape(self, name: str) -> tuple[int, ...]:
        s = self._slots[name]
        shape = s.file.shape(s.key)
        return shape if s.stop is None else (s.stop - s.start, *shape[1:])

    def dtype(self, name: str) -> np.dtype:
        s = self._slots[name]
        return s.file.dtype(s.key)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of tensor `name` in HF layout (a new array)."""
        s, shape = self._slots[name], self.shape(name)
        if not shape:
            return s.file.read(s.key)
        stop = shape[0] if stop is None else stop
        return s.file.read(s.key, s.start + start, s.start + stop)

    def file_of(self, name: str) -> Path:
        return self._slots[name].file.path

    def label(self, name: str) -> str:
        """A tensor as messages name it: the HF name, and for a part of a fused OLMo
        tensor also which rows of which tensor it is."""
        s = self._slots[name]
        if s.key == name:
            return repr(name)
        rows = "" if s.stop is None else f" rows {s.start}:{s.stop}"
        return f"{name!r} (= {s.key!r}{rows})"

    def file_name(self, name: str) -> str:
        """The checkpoint's own name for HF tensor `name` (for messages about a
        missing tensor)."""
        return olmo_format.olmo_name(name) if self.kind.startswith("olmo") else name


def check_layer_count(n: Any, key: str, names: Iterable[str], source: str) -> None:
    """Refuse a config that claims more layers than the weights hold, before a model of
    that many layers is built (a forged count would otherwise take minutes)."""
    found = {int(m.group(1)) for k in names if (m := _LAYER_KEY.match(k))}
    held = max(found) + 1 if found else 0
    if isinstance(n, int) and n > held:
        where = f" (layers 0 to {held - 1})" if held else ""
        raise FormatError(f"{source}: {key}={n} but the weights hold {held} layer(s){where}; "
                          f"set {key} to {held} or use the complete checkpoint")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(member(path.parent, path.name, str(path.parent)).read_bytes())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e}); fix or re-save it") from None
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object; expected a Hugging Face config")
    return data


def _hf(path: Path, overrides: dict[str, Any]) -> Source:
    config_file = path / "config.json"
    hf = _read_json(config_file)
    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        kind, files = "hf-safetensors", hf_safetensors(path)
    elif (path / "pytorch_model.bin.index.json").exists() or (path / "pytorch_model.bin").exists():
        kind, files = "hf-bin", hf_torch_bins(path)
    else:
        raise FormatError(f"{path}: config.json but no weights (model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin); copy them in")
    check_layer_count(hf.get("num_hidden_layers"), "num_hidden_layers", files, str(config_file))
    try:
        cfg = config_from_hf(hf, weight_repo_layers=repo_layers_in(files),
                             source=str(config_file), **overrides)
    except FormatError:
        raise
    except KeyError as e:
        raise FormatError(f"{config_file}: missing key {e}; it is not a complete OLMo-2 "
                          "config") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{config_file}: bad value ({e})") from None
    return Source(path, kind, cfg, {name: _Slot(f, name) for name, f in files.items()})


def _olmo(path: Path, overrides: dict[str, Any]) -> Source:
    config_file = member(path, olmo_format.CONFIG_FILE, str(path))
    m = olmo_format.read_config(config_file)
    weights = next((path / f for f in olmo_format.WEIGHT_FILES if (path / f).exists()), None)
    if weights is None:
        raise FormatError(f"{path}: config.yaml but no model.safetensors or model.pt; point at "
                          "an unsharded OLMo checkpoint directory")
    weights = member(path, weights.name, str(path))
    if weights.suffix == ".safetensors":
        kind, file = "olmo-safetensors", SafetensorsFile(weights)
    else:
        kind, file = "olmo-pt", TorchFile(weights)
    by_name: dict[str, str] = {}
    for key in file.keys():
        name = olmo_format.strip_wrappers(olmo_format.decode_key(key, str(weights)))
        if name in by_name:
            raise FormatError(f"{weights}: tensor {name!r} appears twice; re-save the checkpoint")
        by_name[name] = key
    check_layer_count(m.get("n_layers"), "model.n_layers", by_name, str(config_file))
    try:
        cfg = olmo_format.config_from_olmo(m, olmo_format.repo_layers(by_name), str(config_file),
                                           **overrides)
    except FormatError:
        raise
    except (TypeError, ValueError) as e:
        raise FormatError(f"{config_file}: bad value ({e})") from None
    slots: dict[str, _Slot] = {}
    for name, key in by_name.items():
        try:
            parts = olmo_format.olmo_tensor_parts(name, cfg)
        except FormatError as e:
            raise FormatError(f"{weights}: {e}; remove it or use the matching config") from None
        rows = parts[-1][2]
        shape = file.shape(key)
        if rows is not None and (not shape or shape[0] != rows):
            split = " + ".join(f"{b - a} ({n.split('.')[-2]})" for n, a, b in parts)
            raise FormatError(f"{weights}: tensor {name!r} has shape {shape} but the config "
                              f"needs {rows} = {split} rows; the weights and config disagree")
        for hf_name, start, stop in parts:
            slots[hf_name] = _Slot(file, key, start, stop)
    return Source(path, kind, cfg, slots)


def open_source(path: str | os.PathLike, **overrides: Any) -> Source:
    """Open a HF or OLMo checkpoint directory; `overrides` set `ModelConfig` fields
    (e.g. param_dtype). Raises FormatError naming what is wrong and how to fix it."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory; point at a checkpoint directory")
    if (path / "config.json").exists():
        return _hf(path, overrides)
    if (path / olmo_format.CONFIG_FILE).exists():
        return _olmo(path, overrides)
    raise FormatError(f"{path}: no config.json (Hugging Face) or config.yaml (OLMo); point at a "
                      "checkpoint directory")
