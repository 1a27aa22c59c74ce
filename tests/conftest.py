"""Shared fixtures: small random OLMo-2 checkpoints written by `transformers`
(plain, GQA) and by our own writer (RePo, which upstream does not know)."""
from __future__ import annotations

import json
import os

# Eight fake CPU devices for the mesh tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on the CPU even where libtpu is installed (requirements-tpu.txt); the
# TPU compile test reaches XLA:TPU through compile-only topology devices instead.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from repo_jax.hf_format import config_to_hf  # noqa: E402

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def hf_olmo2(num_key_value_heads: int = 4, seed: int = 0, **overrides):
    """A randomly initialised upstream `Olmo2ForCausalLM` in float32, eval mode."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    fields = {**SMALL, "num_key_value_heads": num_key_value_heads, **overrides}
    cfg = Olmo2Config(**fields, rope_theta=500000.0, rms_norm_eps=1e-6, eos_token_id=1, pad_token_id=0,
                      bos_token_id=None,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = Olmo2ForCausalLM(cfg).float().eval()
    # Random norm weights, so that a norm read from the wrong tensor shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def add_repo_maps(sd: dict[str, torch.Tensor], cfg, seed: int = 1, scale: float = 0.3):
    """Add random RePo maps for `cfg.repo_layers`. `scale` makes positions spread over
    several units so that a wrong rotation changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    d, r, h = cfg.hidden_size, cfg.repo_hidden_size, cfg.num_attention_heads
    for i in cfg.repo_layers:
        p = f"model.layers.{i}.self_attn."
        sd[p + "gate_map.weight"] = torch.randn(r, d, generator=g) * scale
        sd[p + "content_map.weight"] = torch.randn(r, d, generator=g) * scale
        sd[p + "final_map.weight"] = torch.randn(h, r, generator=g) * scale
    return sd


def write_hf_dir(path, sd: dict[str, torch.Tensor], cfg, hf_config: dict | None = None):
    """Write config.json + model.safetensors the way `save_pretrained` lays them out."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config or config_to_hf(cfg), indent=1))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def tokens():
    return np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(2, 24)).astype(np.int32)
