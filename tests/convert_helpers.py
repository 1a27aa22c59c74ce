"""Small checkpoints in every layout `convert import` reads, written the way their
own tools write them: transformers' `save_pretrained`, `torch.save` in the layout
transformers 4 used for `pytorch_model*.bin` (transformers 5 no longer writes it),
and OLMo's trainer layout (config.yaml + model.pt, or model.safetensors with OLMo's
pickled-key encoding)."""
from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import torch
import yaml

from repo_jax.config import ModelConfig
from repo_jax.hf_format import config_to_hf


def save_bin(path: Path, sd: dict[str, torch.Tensor], hf_config: dict, shards: int = 1) -> Path:
    """HF directory with pytorch_model.bin, or `shards` files plus their index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config))
    names = list(sd)
    if shards == 1:
        torch.save({k: v.contiguous() for k, v in sd.items()}, path / "pytorch_model.bin")
        return path
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({k: sd[k].contiguous() for k in part}, path / file)
        weight_map.update({k: file for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def olmo_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A HF OLMo-2 state dict in OLMo's own names, fused as olmo/model.py builds its
    modules: att_proj = [q; k; v], ff_proj = [up; gate] (`x, gate = chunk(2)`)."""
    out = {"transformer.wte.weight": hf_sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": hf_sd["model.norm.weight"]}
    if "lm_head.weight" in hf_sd:
        out["transformer.ff_out.weight"] = hf_sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        h, o = f"model.layers.{i}.", f"transformer.blocks.{i}."
        a = lambda n: hf_sd[h + n + ".weight"]  # noqa: E731
        out[o + "att_proj.weight"] = torch.cat([a("self_attn.q_proj"), a("self_attn.k_proj"),
                                                a("self_attn.v_proj")])
        out[o + "attn_out.weight"] = a("self_attn.o_proj")
        out[o + "q_norm.weight"] = a("self_attn.q_norm")
        out[o + "k_norm.weight"] = a("self_attn.k_norm")
        out[o + "attn_norm.weight"] = a("post_attention_layernorm")
        out[o + "ff_norm.weight"] = a("post_feedforward_layernorm")
        out[o + "ff_proj.weight"] = torch.cat([a("mlp.up_proj"), a("mlp.gate_proj")])
        out[o + "ff_out.weight"] = a("mlp.down_proj")
        for m in ("gate_map", "content_map", "final_map"):
            if h + f"self_attn.{m}.weight" in hf_sd:
                out[o + m + ".weight"] = a("self_attn." + m)
    return out


def olmo_config(cfg: ModelConfig, **extra) -> dict:
    """An OLMo trainer config.yaml (the parts a model needs, plus trainer noise)."""
    model = dict(
        d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, n_layers=cfg.num_hidden_layers,
        mlp_hidden_size=2 * cfg.intermediate_size, mlp_ratio=4, activation_type="swiglu",
        block_type="sequential", rope=True, rope_theta=cfg.rope_theta, rope_full_precision=True,
        alibi=False, norm_after=True, attention_layer_norm=True, include_bias=False,
        bias_for_layer_norm=False, layer_norm_type="rms", layer_norm_with_affine=True,
        layer_norm_eps=cfg.rms_norm_eps, clip_qkv=None, vocab_size=cfg.vocab_size - 10,
        embedding_size=cfg.vocab_size, weight_tying=False, max_sequence_length=256,
        eos_token_id=1, pad_token_id=0, init_std=0.02, attention_dropout=0.0)
    if cfg.repo_layers:
        model.update(dynamic_pe_mode="swigluex_multihead",
                     dynamic_pe_start_layer=cfg.repo_start_layer)
    model.update(extra)
    return {"run_name": "test", "seed": 6198, "model": model,
            "optimizer": {"name": "adamw", "learning_rate": 4e-4}, "max_duration": "10ba"}


def _olmo_key(name: str) -> str:
    # olmo/safetensors_util.py encode_key: base64 of a pickled (keys, value_is_pickled).
    return base64.urlsafe_b64encode(pickle.dumps(((name,), False))).decode("ascii")


def save_olmo(path: Path, hf_sd: dict[str, torch.Tensor], cfg: ModelConfig,
              fmt: str = "pt", config: dict | None = None) -> Path:
    """An unsharded OLMo checkpoint directory: config.yaml + model.pt or
    model.safetensors (OLMo's key encoding)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config or olmo_config(cfg)))
    sd = {k: v.contiguous() for k, v in olmo_state_dict(hf_sd, cfg).items()}
    if fmt == "pt":
        torch.save(sd, path / "model.pt")
    else:
        save_file({_olmo_key(k): v for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


def repo_hf_config(cfg: ModelConfig, spelling: str = "both", rope: str = "both") -> dict:
    """config.json of a RePo checkpoint with the start layer under one or both
    spellings, and rope_theta top-level, in transformers 5's rope_parameters, or both."""
    hf = config_to_hf(cfg)
    pe = hf["pe_config"]
    if spelling == "typo":
        pe.pop("dynamic_pe_start_layer"), pe.pop("dynamic_pe_layer_ids")
    elif spelling == "correct":
        pe.pop("dynmaic_pe_start_layer"), pe.pop("dynmaic_pe_layer_ids")
    if rope == "parameters":
        hf.pop("rope_theta")
    elif rope == "top":
        hf.pop("rope_parameters")
    return hf


def edit_safetensors_header(file: Path, change) -> None:
    """Rewrite the JSON header of a safetensors file in place (`change(header)` edits
    the dict), keeping the data bytes: how a corrupt or forged file is made."""
    import struct

    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
