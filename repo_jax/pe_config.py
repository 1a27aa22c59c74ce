"""The authors' position-encoding settings: read as their code reads them, written so
that their code reads them back.

Their transformers fork (SakanaAI/repo, models/olmo2/modeling_olmo2.py) reads
`config.json`'s `pe_config`:
- `dynamic_pe_mode`: 'none' (or absent) = plain RoPE, 'nope' = the chosen layers run
  without rotation, 'swigluex_multihead' = RePo on the chosen layers. Every other
  layer is plain RoPE.
- the chosen layers: `dynmaic_pe_layer_ids` (a comma string; empty or absent = all
  layers), keeping only ids >= `dynmaic_pe_start_layer` (absent = 0). It reads ONLY
  these misspelled keys; its `PEConfig` also writes the correctly spelled
  `dynamic_pe_*` keys, which the model never reads.
Their OLMo fork reads the same three settings from `config.yaml`'s `model:` section,
spelled correctly.

`layer_schemes_from` applies these rules and then lets the weights decide: the
layers holding RePo maps must be those of the authors' reading, or else those of the
other spelling's reading (loaded with one warning naming both); otherwise the
checkpoint is refused.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from repo_jax.errors import FormatError

NONE, NOPE, REPO = "none", "nope", "swigluex_multihead"
SCHEME_OF_MODE = {NONE: "rope", NOPE: "nope", REPO: "repo"}
AUTHORS_HF = "dynmaic"    # the spelling their transformers code reads from config.json
AUTHORS_OLMO = "dynamic"  # the spelling their OLMo fork reads from config.yaml
_SPELLINGS = ("dynmaic", "dynamic")


class PeConfigWarning(UserWarning):
    """The weights follow the spelling of the layer keys that the authors' code ignores."""


def _keys(spelling: str) -> tuple[str, str]:
    return f"{spelling}_pe_start_layer", f"{spelling}_pe_layer_ids"


@dataclass(frozen=True)
class _Reading:
    """The layers one spelling's keys choose, and those keys as a message shows them."""
    layers: tuple[int, ...]
    keys: str


def _start(pe: Mapping[str, Any], key: str, where: str) -> int:
    value = pe.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"{where}{key}={value!r}: expected a layer number (an integer >= 0)")
    return value


def _ids(pe: Mapping[str, Any], key: str, where: str) -> list[int]:
    """The listed layer ids; [] when none are listed (their code: all layers)."""
    value = pe.get(key)
    bad = FormatError(f"{where}{key}={value!r}: expected layer numbers as a comma-separated "
                      "string ('1,3'; empty = all layers) or a list of integers")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            return [int(part) for part in value.split(",")]
        except ValueError:
            raise bad from None
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                       for i in value):
        return list(value)
    raise bad


def _reading(pe: Mapping[str, Any], spelling: str, num_layers: int, source: str,
             where: str) -> _Reading:
    start_key, ids_key = _keys(spelling)
    start = _start(pe, start_key, f"{source}: {where}")
    ids = _ids(pe, ids_key, f"{source}: {where}") or range(num_layers)
    shown = ", ".join(f"{where}{k}={pe[k]!r}" for k in (start_key, ids_key)
                      if pe.get(k) is not None) or f"no {spelling}_pe_* keys: start 0, all layers"
    # Ids past the last layer choose nothing, as in their code.
    return _Reading(tuple(sorted({i for i in ids if start <= i < num_layers})), shown)


def _mode(pe: Mapping[str, Any], where: str) -> str:
    """`dynamic_pe_mode`, checked: one of the modes repo-jax implements."""
    mode = pe.get("dynamic_pe_mode")
    if mode is None:
        return NONE
    if not isinstance(mode, str):
        raise FormatError(f"{where}dynamic_pe_mode={mode!r}: expected a string, one of "
                          f"{list(SCHEME_OF_MODE)}")
    if mode not in SCHEME_OF_MODE:
        raise FormatError(f"{where}dynamic_pe_mode={mode!r} is not supported; repo-jax reads "
                          f"{NONE!r} (plain RoPE), {NOPE!r} (NoPE layers) and {REPO!r} (RePo)")
    return mode


def layer_schemes_from(pe: Mapping[str, Any] | None, num_layers: int,
                       weight_repo_layers: Sequence[int] | None, *, source: str, where: str,
                       spelling: str) -> tuple[str, ...]:
    """Per-layer schemes ('rope', 'nope', 'repo') of the settings `pe` (None: there are
    none), whose keys messages show as `where` + key, read first with the keys of
    `spelling` (what the authors' code reads). `weight_repo_layers`: the layers whose
    RePo maps the weights hold (None: the settings alone decide)."""
    absent = pe is None
    pe = pe or {}
    mode = _mode(pe, f"{source}: {where}")
    authors = _reading(pe, spelling, num_layers, source, where)
    other_spelling = next(s for s in _SPELLINGS if s != spelling)
    other = None
    if any(pe.get(k) is not None for k in _keys(other_spelling)):
        other = _reading(pe, other_spelling, num_layers, source, where)
        if other.layers == authors.layers:
            other = None
    chosen = authors
    weights = None if weight_repo_layers is None else tuple(sorted(weight_repo_layers))
    if weights is not None and mode == REPO and weights != authors.layers:
        if other is None or weights != other.layers:
            gives = (f"RePo on layers {list(authors.layers)} as the authors' code reads it "
                     f"({authors.keys})")
            if other is not None:
                gives += (f" and on layers {list(other.layers)} with the other spelling "
                          f"({other.keys})")
            raise FormatError(f"{source}: {where}dynamic_pe_mode={mode!r} gives {gives}, but the "
                              f"weights have RePo maps on layers {list(weights)}; set both "
                              "spellings of the start layer / layer ids to the weights' layers")
        chosen = other
        warnings.warn(f"{source}: the weights have RePo maps on layers {list(other.layers)} "
                      f"({other.keys}), but the authors' code reads only the {spelling}_pe_* keys "
                      f"and would put RePo on layers {list(authors.layers)} ({authors.keys}); "
                      f"loading RePo on layers {list(other.layers)} as the weights have it "
                      "(`python -m convert export` writes both spellings equal)", PeConfigWarning,
                      stacklevel=2)
    elif weights and mode != REPO:
        says = (f"has no {where.rstrip('.')}" if absent else
                f"says {where}dynamic_pe_mode={mode!r}" if "dynamic_pe_mode" in pe else
                f"does not set {where}dynamic_pe_mode")
        raise FormatError(f"{source}: the weights have RePo maps on layers {list(weights)} but "
                          f"the config {says}, which the authors' code reads as no RePo layers; "
                          f"set {where}dynamic_pe_mode={REPO!r} and the start layer / layer ids "
                          "(both spellings) to the weights' layers")
    elif mode == NOPE and other is not None:
        warnings.warn(f"{source}: {where}dynamic_pe_mode='nope' is on layers "
                      f"{list(authors.layers)} as the authors' code reads it ({authors.keys}) but "
                      f"on layers {list(other.layers)} with the other spelling ({other.keys}); "
                      "NoPE layers have no weights to tell, so following the authors' code",
                      PeConfigWarning, stacklevel=2)
    scheme = SCHEME_OF_MODE[mode]
    return tuple(scheme if i in chosen.layers else "rope" for i in range(num_layers))


def hf_pe_config(schemes: Sequence[str]) -> dict[str, Any]:
    """`pe_config` for config.json: the mode and layers under both spellings, equal, so
    the authors' code and readers of the correct spelling agree. One mode per model:
    RePo layers win over NoPE ones (see `export_note`)."""
    repo = [i for i, s in enumerate(schemes) if s == "repo"]
    nope = [i for i, s in enumerate(schemes) if s == "nope"]
    mode, layers = (REPO, repo) if repo else (NOPE, nope) if nope else (NONE, [])
    start = layers[0] if layers else 0
    ids = "" if layers == list(range(start, len(schemes))) else ",".join(map(str, layers))
    pe: dict[str, Any] = {"dynamic_pe_mode": mode}
    for spelling in ("dynamic", "dynmaic"):
        start_key, ids_key = _keys(spelling)
        pe[start_key], pe[ids_key] = start, ids
    return pe


def export_note(schemes: Sequence[str]) -> str | None:
    """What the authors' code does differently with `hf_pe_config(schemes)`, or None."""
    repo = [i for i, s in enumerate(schemes) if s == "repo"]
    nope = [i for i, s in enumerate(schemes) if s == "nope"]
    if not (repo and nope):
        return None
    return (f"this model has RePo on layers {repo} and NoPE on layers {nope}; pe_config holds "
            f"one dynamic_pe_mode, so it says {REPO!r} on layers {repo} and the authors' code "
            f"(and any reader of this export, repo-jax included) runs layers {nope} with RoPE, "
            "which changes the outputs")
