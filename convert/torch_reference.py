"""An independent PyTorch OLMo-2 + RePo forward, written from the formulas.

Used to verify conversions (`python -m convert import --verify`) and by the parity
tests, so it shares no code with the JAX model. `forward` reads a Hugging Face state
dict (`model.layers.N.self_attn.q_proj.weight`, ...), `forward_olmo` an OLMo
training-repo one (`transformer.blocks.N.att_proj.weight`, ...), each with a
`ModelConfig`-like object.
RePo layer l: z = final_map(silu(gate_map(x)) * content_map(x)) on the block input
x, one real position per token and head, used in place of the integer index in
RoPE for that head's q and k.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _inv_freq(cfg) -> tuple[torch.Tensor, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = getattr(cfg, "rope_scaling_factor", 1.0)
    if factor == 1.0:
        return freq.float(), 1.0
    orig = cfg.original_max_position_embeddings

    def cdim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(cdim(cfg.yarn_beta_fast)), 0)
    hi = min(math.ceil(cdim(cfg.yarn_beta_slow)), dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    return (freq / factor * ramp + freq * (1 - ramp)).float(), 0.1 * math.log(factor) + 1.0


def _rotate(x: torch.Tensor, pos: torch.Tensor, cfg) -> torch.Tensor:
    """x [B, H, T, D]; pos [B, H or 1, T] real-valued positions."""
    inv, scale = _inv_freq(cfg)
    ang = pos.float()[..., None] * inv
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos() * scale, ang.sin() * scale
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def _hf_weights(sd: dict[str, torch.Tensor], cfg):
    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     o="self_attn.o_proj", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
                     attn_norm="post_attention_layernorm", mlp_norm="post_feedforward_layernorm",
                     gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                     gate_map="self_attn.gate_map", content_map="self_attn.content_map",
                     final_map="self_attn.final_map")
        return {k: sd[p + n + ".weight"] for k, n in names.items() if p + n + ".weight" in sd}

    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return sd["model.embed_tokens.weight"], layer, sd["model.norm.weight"], head


def _olmo_weights(sd: dict[str, torch.Tensor], cfg):
    """OLMo's modules, read the way olmo/model.py uses them: `att_proj` output is
    split by fused_dims (d_model, kv * head_dim, kv * head_dim); the SwiGLU is
    `x, gate = ff_proj(h).chunk(2); silu(gate) * x`; with `norm_after`, `attn_norm`
    and `ff_norm` normalise the attention and MLP outputs."""
    sd = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in sd.items()}
    kv_dim = cfg.num_key_value_heads * cfg.head_dim

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"transformer.blocks.{i}."
        q, k, v = sd[p + "att_proj.weight"].split([cfg.hidden_size, kv_dim, kv_dim], dim=0)
        up, gate = sd[p + "ff_proj.weight"].chunk(2, dim=0)
        w = dict(q=q, k=k, v=v, o=sd[p + "attn_out.weight"], q_norm=sd[p + "q_norm.weight"],
                 k_norm=sd[p + "k_norm.weight"], attn_norm=sd[p + "attn_norm.weight"],
                 mlp_norm=sd[p + "ff_norm.weight"], gate=gate, up=up, down=sd[p + "ff_out.weight"])
        for m in ("gate_map", "content_map", "final_map"):
            if p + m + ".weight" in sd:
                w[m] = sd[p + m + ".weight"]
        return w

    head = sd.get("transformer.ff_out.weight", sd["transformer.wte.weight"])
    return sd["transformer.wte.weight"], layer, sd["transformer.ln_f.weight"], head


def forward(sd: dict[str, torch.Tensor], cfg, input_ids: torch.Tensor, *, grad: bool = False):
    """Logits [B, T, V] and {RePo layer: positions [B, H, T]} for a HF state dict.
    `grad=True` records autograd, for gradient parity (tensors of `sd` that require grad
    get theirs)."""
    with torch.set_grad_enabled(grad):
        return _forward(*_hf_weights(sd, cfg), cfg, input_ids)


@torch.no_grad()
def forward_olmo(sd: dict[str, torch.Tensor], cfg, input_ids: torch.Tensor):
    """The same for an OLMo training-repo state dict."""
    return _forward(*_olmo_weights(sd, cfg), cfg, input_ids)


def _forward(embed, layer, final_norm, head, cfg, input_ids: torch.Tensor):
    b, t = input_ids.shape
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    x = embed[input_ids]
    int_pos = torch.arange(t, dtype=torch.float32)[None, None].expand(b, 1, t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    positions = {}
    for i, scheme in enumerate(cfg.layer_schemes):
        w = layer(i)
        q = _rms(x @ w["q"].T, w["q_norm"], eps)
        k = _rms(x @ w["k"].T, w["k_norm"], eps)
        v = x @ w["v"].T
        q = q.view(b, t, h, hd).transpose(1, 2)
        k = k.view(b, t, kv, hd).transpose(1, 2)
        v = v.view(b, t, kv, hd).transpose(1, 2)
        if scheme == "repo":
            g = x.float() @ w["gate_map"].float().T
            c = x.float() @ w["content_map"].float().T
            z = (F.silu(g) * c) @ w["final_map"].float().T  # [B, T, H]
            pos = z.transpose(1, 2)
            positions[i] = pos
        else:
            pos = int_pos
        if scheme != "nope":
            q, k = _rotate(q, pos, cfg), _rotate(k, pos, cfg)
        k = k.repeat_interleave(h // kv, dim=1)
        v = v.repeat_interleave(h // kv, dim=1)
        att = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        a = (att @ v.float()).to(x.dtype).transpose(1, 2).reshape(b, t, h * hd)
        hmid = x + _rms(a @ w["o"].T, w["attn_norm"], eps)
        mlp = (F.silu(hmid @ w["gate"].T) * (hmid @ w["up"].T)) @ w["down"].T
        x = hmid + _rms(mlp, w["mlp_norm"], eps)
    x = _rms(x, final_norm, eps)
    return (x @ head.T).float(), positions
