"""Typed, frozen model configuration with validation and presets.

Field names follow the Hugging Face `Olmo2Config` so that `config.json` maps
onto them with few renames (see `repo_jax/hf_format.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POSITION_SCHEMES = ("rope", "nope", "repo")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "blockwise", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the field and the fix."""


def layer_schemes(
    num_layers: int,
    repo_start_layer: int | None = None,
    base: str = "rope",
    repo_layers: tuple[int, ...] | None = None,
) -> tuple[str, ...]:
    """Per-layer position schemes: `base` everywhere, `repo` from the start layer
    (or on the explicit `repo_layers`)."""
    if repo_start_layer is not None and not 0 <= repo_start_layer < num_layers:
        raise ConfigError(
            f"repo_start_layer={repo_start_layer} is outside the model's "
            f"{num_layers} layers; use a value in [0, {num_layers - 1}]"
        )
    chosen = set(repo_layers or ())
    if repo_start_layer is not None:
        chosen |= set(range(repo_start_layer, num_layers))
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(f"repo_layers {bad} are outside the model's {num_layers} layers")
    return tuple("repo" if i in chosen else base for i in range(num_layers))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 100352
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # One of POSITION_SCHEMES per layer; empty means RoPE everywhere.
    layer_schemes: tuple[str, ...] = ()
    # RePo's gate/content maps project d -> d / repo_reduction.
    repo_reduction: int = 8
    # YaRN: factor 1.0 is plain RoPE; >1 stretches to factor * original length.
    rope_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "xla"
    attention_block_size: int = 512
    remat: str = "none"
    init_std: float = 0.02
    eos_token_id: int = 100257
    pad_token_id: int = 100277
    bos_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_schemes:
            object.__setattr__(self, "layer_schemes", ("rope",) * self.num_hidden_layers)
        else:
            object.__setattr__(self, "layer_schemes", tuple(self.layer_schemes))
        self.validate()

    # ---- derived -------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def repo_hidden_size(self) -> int:
        return self.hidden_size // self.repo_reduction

    @property
    def repo_layers(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.layer_schemes) if s == "repo")

    @property
    def repo_start_layer(self) -> int | None:
        """First RePo layer, or None when the model has none."""
        return self.repo_layers[0] if self.repo_layers else None

    # ---- validation ----------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "repo_reduction", "original_max_position_embeddings", "attention_block_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name}={value!r} must be a positive integer")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"num_attention_heads={self.num_attention_heads} does not divide "
             f"hidden_size={self.hidden_size}; choose heads that divide it")
        need(self.head_dim % 2 == 0,
             f"head_dim={self.head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_key_value_heads={self.num_key_value_heads} must divide "
             f"num_attention_heads={self.num_attention_heads}")
        need(self.hidden_size % self.repo_reduction == 0,
             f"repo_reduction={self.repo_reduction} must divide hidden_size={self.hidden_size}")
        need(len(self.layer_schemes) == self.num_hidden_layers,
             f"layer_schemes has {len(self.layer_schemes)} entries but the model has "
             f"num_hidden_layers={self.num_hidden_layers}; give one scheme per layer")
        for i, s in enumerate(self.layer_schemes):
            need(s in POSITION_SCHEMES,
                 f"layer_schemes[{i}]={s!r} is not a position scheme; use one of {POSITION_SCHEMES}")
        need(not self.repo_layers or self.num_key_value_heads == self.num_attention_heads,
             f"RePo assigns positions per query head and needs num_key_value_heads == "
             f"num_attention_heads (got {self.num_key_value_heads} vs {self.num_attention_heads}); "
             f"use full multi-head attention or no RePo layers")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
        need(self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be positive")
        need(self.rope_scaling_factor >= 1.0,
             f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1.0 (1.0 disables YaRN)")
        need(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r}; use one of {DTYPES}")
        need(self.dtype in DTYPES, f"dtype={self.dtype!r}; use one of {DTYPES}")
        need(self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}")
        need(self.remat in REMAT_POLICIES, f"remat={self.remat!r}; use one of {REMAT_POLICIES}")
        need(self.init_std > 0, f"init_std={self.init_std} must be positive")

    # ---- construction --------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`; `repo_start_layer=` re-derives the layer schemes."""
        start = changes.pop("repo_start_layer", None)
        cfg = dataclasses.replace(self, **changes)
        if start is not None:
            base = next((s for s in cfg.layer_schemes if s != "repo"), "rope")
            cfg = dataclasses.replace(
                cfg, layer_schemes=layer_schemes(cfg.num_hidden_layers, start, base))
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (YAML/JSON); unknown keys are an error naming them.
        Accepts `repo_start_layer` (and `base_scheme`) as shorthand for `layer_schemes`."""
        data = dict(data)
        start = data.pop("repo_start_layer", None)
        base = data.pop("base_scheme", "rope")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; known keys: {sorted(names)}")
        if "layer_schemes" in data:
            data["layer_schemes"] = tuple(data["layer_schemes"])
        elif start is not None or base != "rope":
            n = data.get("num_hidden_layers", cls.num_hidden_layers)
            data["layer_schemes"] = layer_schemes(n, start, base)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_schemes"] = list(self.layer_schemes)
        return d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """`olmo2-1b`, `olmo2-7b`, `olmo2-13b`, `tiny`, each also with `-repo`."""
        base_name = name.removesuffix("-repo")
        if base_name not in _PRESETS:
            known = sorted(list(_PRESETS) + [k + "-repo" for k in _PRESETS])
            raise ConfigError(f"unknown model preset {name!r}; known presets: {known}")
        fields, repo_start = _PRESETS[base_name]
        cfg = cls(**fields)
        if name.endswith("-repo"):
            cfg = cfg.replace(repo_start_layer=repo_start)
        return cfg.replace(**overrides) if overrides else cfg


# name -> (fields, RePo start layer used by the `-repo` variant)
_PRESETS: dict[str, tuple[dict[str, Any], int]] = {
    "olmo2-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16), 5),
    "olmo2-7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32), 10),
    "olmo2-13b": (dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40), 13),
    # CPU-sized, with the real dolma2 vocabulary so it trains on real tokens.
    "tiny": (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=1024, original_max_position_embeddings=1024), 1),
}
