"""The OLMo training-repo checkpoint layout (`config.yaml` + `model.pt` or
`model.safetensors`), expressed in terms of Hugging Face names.

OLMo fuses some projections: `att_proj` holds rows [q; k; v] and `ff_proj` rows
[up; gate] (OLMo's SwiGLU is `x, gate = chunk(2); silu(gate) * x`). `attn_norm` and
`ff_norm` are OLMo-2's post-attention and post-feedforward norms (`norm_after`).
Everything else is a rename. The HF side then goes through `repo_jax.hf_format`, the
one place that knows our parameter paths.
"""
from __future__ import annotations

import base64
import binascii
import io
import pickle
import re
from pathlib import Path
from typing import Any

import yaml

from repo_jax.config import ModelConfig
from repo_jax.errors import FormatError
from repo_jax.hf_format import config_from_hf
from repo_jax.pe_config import AUTHORS_OLMO, layer_schemes_from

CONFIG_FILE = "config.yaml"
WEIGHT_FILES = ("model.safetensors", "model.pt")  # OLMo itself prefers the safetensors file

# OLMo module -> the HF modules it holds, in row order.
_GLOBAL = {"transformer.wte": ("model.embed_tokens",), "transformer.ln_f": ("model.norm",),
           "transformer.ff_out": ("lm_head",)}
_BLOCK = {
    "att_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "q_norm": ("self_attn.q_norm",), "k_norm": ("self_attn.k_norm",),
    "attn_norm": ("post_attention_layernorm",), "ff_norm": ("post_feedforward_layernorm",),
    "ff_proj": ("mlp.up_proj", "mlp.gate_proj"),
    "ff_out": ("mlp.down_proj",),
    "gate_map": ("self_attn.gate_map",), "content_map": ("self_attn.content_map",),
    "final_map": ("self_attn.final_map",),
}
_BLOCK_KEY = re.compile(r"^transformer\.blocks\.(\d+)\.(\w+)\.weight$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")

# model.<key>: value OLMo-2 uses, and OLMo's default when the key is absent.
_ARCHITECTURE = {
    "rope": (True, False), "alibi": (False, False), "norm_after": (True, False),
    "attention_layer_norm": (True, False), "include_bias": (False, True),
    "layer_norm_type": ("rms", "default"), "activation_type": ("swiglu", "swiglu"),
    "block_type": ("sequential", "sequential"), "clip_qkv": (None, None),
    "scale_logits": (False, False), "embedding_layer_norm": (False, False),
    "layer_norm_with_affine": (True, True), "attention_layer_norm_with_affine": (True, True),
}

# model.<key>: the type OLMo's ModelConfig (and, for dynamic_pe_*, the authors' fork of
# it) declares, and whether it may be null. Every key repo-jax reads is checked before
# use; numbers written as strings are converted, as OmegaConf's typed fields do.
_INT, _FLOAT, _BOOL, _STR = "an integer", "a number", "true or false", "a string"
_TYPES: dict[str, tuple[str, bool]] = {
    **{k: (_INT, False) for k in ("d_model", "n_heads", "n_layers", "mlp_ratio", "vocab_size",
                                  "max_sequence_length", "eos_token_id", "pad_token_id",
                                  "dynamic_pe_start_layer", "dynmaic_pe_start_layer")},
    **{k: (_INT, True) for k in ("n_kv_heads", "mlp_hidden_size", "embedding_size")},
    **{k: (_FLOAT, False) for k in ("rope_theta", "layer_norm_eps")},
    "clip_qkv": (_FLOAT, True),
    **{k: (_BOOL, False) for k, (want, _) in _ARCHITECTURE.items() if isinstance(want, bool)},
    "weight_tying": (_BOOL, False),
    **{k: (_BOOL, True) for k in ("multi_query_attention", "bias_for_layer_norm")},
    **{k: (_STR, False) for k in ("layer_norm_type", "activation_type", "block_type",
                                  "dynamic_pe_mode", "dynamic_pe_layer_ids",
                                  "dynmaic_pe_layer_ids")},
}


def _rows(hf_module: str, cfg: ModelConfig) -> int | None:
    """Rows a fused part takes in its OLMo tensor (None: the module is not fused)."""
    return {"self_attn.q_proj": cfg.num_attention_heads * cfg.head_dim,
            "self_attn.k_proj": cfg.num_key_value_heads * cfg.head_dim,
            "self_attn.v_proj": cfg.num_key_value_heads * cfg.head_dim,
            "mlp.up_proj": cfg.intermediate_size,
            "mlp.gate_proj": cfg.intermediate_size}.get(hf_module)


def strip_wrappers(name: str) -> str:
    """OLMo FSDP checkpoints may prefix modules with `_fsdp_wrapped_module.`."""
    return name.replace("_fsdp_wrapped_module.", "")


def olmo_tensor_parts(name: str, cfg: ModelConfig) -> list[tuple[str, int, int | None]]:
    """`transformer.blocks.3.att_proj.weight` -> [(HF name, first row, end row), ...]:
    which rows of the OLMo tensor are which HF tensor (end None: all of it). Raises
    FormatError for a name OLMo-2 does not have."""
    m = _BLOCK_KEY.match(name)
    if m:
        layer, module = m.group(1), m.group(2)
        parts = _BLOCK.get(module)
        prefix = f"model.layers.{layer}."
    else:
        parts = _GLOBAL.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        prefix = ""
    if parts is None:
        raise FormatError(f"unexpected tensor {name!r}: not an OLMo-2 or RePo parameter")
    if len(parts) == 1:
        return [(prefix + parts[0] + ".weight", 0, None)]
    out, row = [], 0
    for part in parts:
        n = _rows(part, cfg)
        out.append((prefix + part + ".weight", row, row + n))
        row += n
    return out


def olmo_name(hf_name: str) -> str:
    """The OLMo tensor that holds HF tensor `hf_name` (alone or fused with others)."""
    m = _HF_LAYER_KEY.match(hf_name)
    if m:
        module = next(k for k, v in _BLOCK.items() if m.group(2) in v)
        return f"transformer.blocks.{m.group(1)}.{module}.weight"
    module = hf_name.removesuffix(".weight")
    return next(k for k, v in _GLOBAL.items() if module in v) + ".weight"


# ---- keys of OLMo's own safetensors files -------------------------------------
class _NoGlobals(pickle.Unpickler):
    """OLMo encodes a key as a pickled (tuple of str, bool): that needs no globals, so
    any global (the way a pickle runs code) is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def decode_key(key: str, source: str) -> str:
    """Tensor name of a key in an OLMo `model.safetensors` (base64 of a pickled key
    tuple, see olmo/safetensors_util.py); plain dotted names pass through."""
    if "." in key:  # not in the base64 alphabet: a plain name
        return key
    try:
        keys, pickled = _NoGlobals(io.BytesIO(base64.urlsafe_b64decode(key))).load()
    except (binascii.Error, pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise FormatError(f"{source}: tensor key {key[:40]!r} is neither a name nor an OLMo "
                          f"encoded key ({e})") from None
    if pickled or not all(isinstance(k, str) for k in keys):
        raise FormatError(f"{source}: entry {keys!r} is not a plain tensor; expected a model "
                          "state dict")
    return ".".join(keys)


# ---- config.yaml ---------------------------------------------------------------
class _OlmoYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 (and OmegaConf, which OLMo loads
    its configs with) does: `1e-6` and `5e5` are numbers, where YAML 1.1 needs a dot
    and returns the string '1e-6'."""


# Appended after PyYAML's own resolvers, so integers and dotted floats resolve as before.
_OlmoYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def read_config(path: str | Path) -> dict[str, Any]:
    """The `model:` section of an OLMo `config.yaml` (or the file itself when it is
    a bare model config), read with YAML 1.2 floats. YAML tags are refused (safe)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_OlmoYamlLoader)
    except FileNotFoundError:
        raise FormatError(f"{path}: not found; point at an OLMo checkpoint directory") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise FormatError(f"{path}: not valid YAML{f' (line {where.line + 1})' if where else ''}; "
                          "fix or re-save the config") from None
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or "d_model" not in model:
        raise FormatError(f"{path}: no OLMo model config (expected a 'model:' section with "
                          "d_model, n_heads, n_layers, ...)")
    return model


def _typed(value: Any, kind: str) -> Any:
    """`value` as `kind`, converted as OmegaConf converts it; raises ValueError."""
    if isinstance(value, bool) != (kind == _BOOL):
        raise ValueError
    if kind == _INT and isinstance(value, (int, str)):
        return int(value)
    if kind == _FLOAT and isinstance(value, (int, float, str)):
        return float(value)
    if kind == _STR and isinstance(value, (str, int, float)):
        return str(value)
    if kind == _BOOL:
        return value
    raise ValueError


def check_types(m: dict[str, Any], source: str) -> dict[str, Any]:
    """The model config with every key repo-jax reads checked against OLMo's declared
    type (a bad value names its key and the expected type)."""
    out = dict(m)
    for key, (kind, nullable) in _TYPES.items():
        if key not in m or (m[key] is None and nullable):
            continue
        try:
            out[key] = _typed(m[key], kind)
        except ValueError:
            null = " or null" if nullable else ""
            raise FormatError(f"{source}: model.{key}={m[key]!r}: expected {kind}{null}") from None
    return out


def olmo_config_to_hf(m: dict[str, Any], source: str) -> dict[str, Any]:
    """The OLMo model config (types checked by `check_types`) as a HF OLMo-2
    `config.json` dict, without `pe_config`. Refuses OLMo architectures that are not
    OLMo-2 (pre-norm, biases, LayerNorm, ALiBi, ...)."""
    for key in ("d_model", "n_heads", "n_layers"):
        if key not in m:
            raise FormatError(f"{source}: model.{key} is missing; an OLMo-2 config needs it as "
                              "an integer")
    for key, (want, default) in _ARCHITECTURE.items():
        got = m.get(key, default)
        if got != want:
            raise FormatError(f"{source}: model.{key}={got!r}, but OLMo-2 has {key}={want!r}; "
                              "only OLMo-2 architectures convert")
    if m.get("bias_for_layer_norm"):
        raise FormatError(f"{source}: model.bias_for_layer_norm=True, but OLMo-2 norms have no "
                          "bias; only OLMo-2 architectures convert")
    heads = m["n_heads"]
    kv = m.get("n_kv_heads") or (1 if m.get("multi_query_attention") else heads)
    hidden = m.get("mlp_hidden_size") or m.get("mlp_ratio", 4) * m["d_model"]
    if hidden % 2:
        raise FormatError(f"{source}: MLP hidden size {hidden} is odd; SwiGLU splits it in two")
    vocab = m.get("embedding_size", 50304) or m.get("vocab_size", 50257)
    hf: dict[str, Any] = {
        "model_type": "olmo2", "vocab_size": vocab, "hidden_size": m["d_model"],
        "intermediate_size": hidden // 2, "num_hidden_layers": m["n_layers"],
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "rope_theta": m.get("rope_theta", 10_000), "rms_norm_eps": m.get("layer_norm_eps", 1e-5),
        "max_position_embeddings": m.get("max_sequence_length", 1024),
        "tie_word_embeddings": m.get("weight_tying", True),
        "eos_token_id": m.get("eos_token_id", 50256), "pad_token_id": m.get("pad_token_id", 50256),
    }
    return hf


def config_from_olmo(m: dict[str, Any], weight_repo_layers: tuple[int, ...], source: str,
                     **overrides: Any) -> ModelConfig:
    """`ModelConfig` of an OLMo model config. Its `dynamic_pe_*` keys are read as the
    authors' OLMo fork reads them, and the weights' RePo layers decide between
    readings (see `repo_jax.pe_config`)."""
    m = check_types(m, source)
    hf = olmo_config_to_hf(m, source)
    schemes = layer_schemes_from(m, m["n_layers"], weight_repo_layers, source=source,
                                 where="model.", spelling=AUTHORS_OLMO)
    return config_from_hf(hf, source=source, layer_schemes=schemes, **overrides)


_REPO_MAP_KEY = re.compile(
    r"^transformer\.blocks\.(\d+)\.(gate_map|content_map|final_map)\.weight$")


def repo_layers(names) -> tuple[int, ...]:
    """The layers whose RePo maps appear among OLMo tensor names."""
    return tuple(sorted({int(m.group(1)) for k in names if (m := _REPO_MAP_KEY.match(k))}))
