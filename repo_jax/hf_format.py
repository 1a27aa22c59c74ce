"""The one place that knows Hugging Face OLMo-2 / RePo names.

- `config_from_hf` / `config_to_hf`: `config.json` <-> `ModelConfig`.
- `hf_to_path` / `path_to_hf`: a tensor name <-> our parameter path, with whether the
  tensor is transposed (torch Linear is [out, in], Flax kernels are [in, out]).
"""
from __future__ import annotations

import math
import re
from typing import Any

from repo_jax.config import ConfigError, ModelConfig
from repo_jax.errors import FormatError
from repo_jax.pe_config import AUTHORS_HF, hf_pe_config, layer_schemes_from

_LINEAR = re.compile(r"(_proj|_map)$")


# ---- tensor names --------------------------------------------------------------
def hf_to_path(key: str) -> tuple[tuple[str | int, ...], bool]:
    """`model.layers.3.self_attn.q_proj.weight` -> (('layers', 3, 'self_attn', 'q_proj',
    'kernel'), True). Raises FormatError for a name OLMo-2 does not have."""
    parts = key.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if not parts or parts[-1] != "weight":
        raise FormatError(f"unexpected tensor {key!r}: OLMo-2 has only bias-free '.weight' tensors")
    owner = parts[-2] if len(parts) >= 2 else ""
    path: list[str | int] = [int(p) if p.isdigit() else p for p in parts[:-1]]
    if owner == "embed_tokens":
        return (*path, "embedding"), False
    if owner == "lm_head" or _LINEAR.search(owner):
        return (*path, "kernel"), True
    if owner.endswith("norm") or owner.endswith("layernorm"):
        return (*path, "weight"), False
    raise FormatError(f"unexpected tensor {key!r}: not an OLMo-2 or RePo parameter")


def path_to_hf(path: tuple[str | int, ...]) -> tuple[str, bool]:
    """Inverse of `hf_to_path`."""
    *module, leaf = path
    name = ".".join(str(p) for p in module) + ".weight"
    prefix = "" if module[0] == "lm_head" else "model."
    return prefix + name, leaf == "kernel"


# ---- config.json -----------------------------------------------------------------
# config.json keys read here and what each must hold (None: optional).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads")
_OPTIONAL_SIZES = ("num_key_value_heads", "max_position_embeddings", "head_dim")


def _check_fields(hf: dict[str, Any], source: str) -> None:
    """Types and ranges of the numeric fields, each refused naming its key before any
    arithmetic on it (a zero head count would otherwise divide by zero)."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _SIZES + _OPTIONAL_SIZES:
        if key not in hf:
            if key in _SIZES:
                raise FormatError(f"{source}: missing key {key!r}; it is not a complete OLMo-2 "
                                  "config")
            continue
        v = hf[key]
        if v is None and key in _OPTIONAL_SIZES:
            continue
        if not is_int(v) or v < 1:
            raise FormatError(f"{source}: {key}={v!r} must be a positive integer; fix config.json")
    for key in ("rope_theta", "rms_norm_eps"):
        v = hf.get(key)
        if key not in hf or (key == "rope_theta" and v is None):  # theta may be in rope_parameters
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise FormatError(f"{source}: {key}={v!r} must be a positive number; fix config.json")
    if not isinstance(hf.get("tie_word_embeddings", False), bool):
        raise FormatError(f"{source}: tie_word_embeddings={hf['tie_word_embeddings']!r} must be "
                          "true or false")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise FormatError(f"{source}: {key}={hf[key]!r} must be an object (or null)")


def config_from_hf(hf: dict[str, Any], *, weight_repo_layers: tuple[int, ...] | None = None,
                   source: str = "config.json", layer_schemes: tuple[str, ...] | None = None,
                   **overrides: Any) -> ModelConfig:
    """`ModelConfig` from a parsed HF `config.json`. Its `pe_config` is read as the
    authors' code reads it, and `weight_repo_layers` (the layers whose RePo maps the
    weights contain) decide between its readings (see `repo_jax.pe_config`).
    `layer_schemes`, when given, replaces what `pe_config` says."""
    if hf.get("model_type") != "olmo2":
        raise FormatError(f"{source}: model_type={hf.get('model_type')!r} is not supported; "
                          "repo-jax reads OLMo-2 ('olmo2') checkpoints")
    _check_fields(hf, source)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise FormatError(f"{source}: neither rope_theta nor rope_parameters.rope_theta is set")
    n = hf["num_hidden_layers"]
    if layer_schemes is None:
        pe = hf.get("pe_config")
        if pe is not None and not isinstance(pe, dict):
            raise FormatError(f"{source}: pe_config={pe!r}: expected a JSON object such as "
                              '{"dynamic_pe_mode": "swigluex_multihead", "dynmaic_pe_start_layer": '
                              "5, ...}")
        layer_schemes = layer_schemes_from(pe, n, weight_repo_layers, source=source,
                                           where="pe_config.", spelling=AUTHORS_HF)
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=n,
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        rope_theta=float(theta), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_schemes=tuple(layer_schemes),
    )
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise FormatError(f"{source}: head_dim={hf['head_dim']} differs from hidden_size / "
                          "num_attention_heads, which OLMo-2 does not do")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise FormatError(f"{source}: rope_type={rope_type!r} is not supported; repo-jax "
                          "implements plain RoPE ('default') and 'yarn'")
    if rope_type == "yarn":
        # transformers' YaRN variants that ours (the paper's) does not implement: refuse them
        # rather than load a model whose rotations silently differ.
        changed = {k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim")
                   if rope.get(k) is not None}
        if rope.get("truncate", True) is not True:
            changed["truncate"] = rope["truncate"]
        if changed:
            raise FormatError(f"{source}: YaRN options {changed} are not supported; remove them "
                              "to use YaRN as in the paper")
        if "original_max_position_embeddings" not in rope:
            raise FormatError(f"{source}: rope_type 'yarn' needs "
                              "original_max_position_embeddings (the pretraining context length)")
        original = int(rope["original_max_position_embeddings"])
        # Without a factor, transformers stretches the original length to max_position_embeddings.
        factor = rope.get("factor") or hf.get("max_position_embeddings", 4096) / original
        fields.update(rope_scaling_factor=float(factor), original_max_position_embeddings=original,
                      yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                      yarn_beta_slow=float(rope.get("beta_slow") or 1.0))
    for key, name in (("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id"),
                      ("bos_token_id", "bos_token_id")):
        if isinstance(hf.get(key), int):
            fields[name] = hf[key]
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise FormatError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A `config.json` for upstream `transformers` and the authors' code: `pe_config`
    says 'none', 'nope' or RePo with both spellings of its layer keys (their code
    reads only the misspelled `dynmaic_*` ones). A model mixing RePo and NoPE layers
    is written as RePo (see `repo_jax.pe_config.export_note`)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor != 1.0:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                "factor": cfg.rope_scaling_factor,
                "original_max_position_embeddings": cfg.original_max_position_embeddings,
                "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}
    hf: dict[str, Any] = {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id, "torch_dtype": cfg.param_dtype,
        "pe_config": hf_pe_config(cfg.layer_schemes),
    }
    if rope["rope_type"] == "yarn":
        hf["rope_scaling"] = rope
    return hf
