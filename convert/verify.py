"""`convert import --verify`: run the source checkpoint in PyTorch and the converted
model in JAX on fixed token sequences and compare the logits.

The PyTorch side reads the source files with its own readers (transformers,
safetensors.torch, torch.load with weights_only=True) and runs upstream
`transformers` for plain (all-RoPE) OLMo-2 Hugging Face checkpoints and the
independent reference (`convert/torch_reference.py`) otherwise (RePo, NoPE, OLMo layout), so a mistake in our readers or
name mapping shows up as a logit difference. With `--dtype bfloat16` the PyTorch
weights are rounded to bfloat16 too and both sides compute in float32: what is
checked is that the weights arrived unchanged, not what bfloat16 costs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from repo_jax.hf_format import FormatError

ATOL = 1e-3       # max |logit difference| at float32 compute
KL_TOL = 1e-5     # mean KL(torch || jax) per token, in nats
SHAPE = (3, 48)   # fixed sequences: batch x tokens


class VerifyError(ValueError):
    """The converted model's logits differ from the source's beyond tolerance."""


def token_ids(vocab_size: int) -> np.ndarray:
    return np.random.default_rng(20251215).integers(0, vocab_size, SHAPE).astype(np.int32)


def _files(path: Path, index: str, single: str) -> list[Path]:
    if (path / index).exists():
        weight_map = json.loads((path / index).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    return [path / single]


def _torch_state_dict(source) -> dict:
    """The source's tensors under the names its files use (OLMo keys decoded)."""
    import torch
    from safetensors.torch import load_file

    from repo_jax.olmo_format import decode_key

    path = source.path
    if source.kind == "hf-safetensors":
        files = _files(path, "model.safetensors.index.json", "model.safetensors")
    elif source.kind == "hf-bin":
        files = _files(path, "pytorch_model.bin.index.json", "pytorch_model.bin")
    else:
        files = [path / ("model.safetensors" if source.kind == "olmo-safetensors" else "model.pt")]
    sd: dict = {}
    for f in files:
        part = (load_file(str(f)) if f.suffix == ".safetensors"
                else torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        sd.update({decode_key(k, str(f)): v for k, v in part.items()})
    return sd


def torch_logits(source, cfg, ids: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """Logits of the source run in PyTorch at float32 (weights rounded to `dtype`)."""
    import torch

    from convert import torch_reference

    def rounded(t):
        t = t.float()
        return t.to(torch.bfloat16).float() if dtype == "bfloat16" else t

    tokens = torch.from_numpy(ids).long()
    if source.kind.startswith("hf") and set(cfg.layer_schemes) == {"rope"}:
        from transformers import Olmo2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # stderr is for our own messages
        model = Olmo2ForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(rounded(p))
            return model(tokens).logits.float().numpy(), "transformers Olmo2ForCausalLM"
    sd = {k: rounded(v) for k, v in _torch_state_dict(source).items()}
    if source.kind.startswith("olmo"):
        logits, _ = torch_reference.forward_olmo(sd, cfg, tokens)
    else:
        logits, _ = torch_reference.forward(sd, cfg, tokens)
    return logits.numpy(), "convert/torch_reference.py"


def jax_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    import jax
    from flax import nnx

    from repo_jax.loading import load_model

    graphdef, state = nnx.split(load_model(model_dir, dtype="float32"))
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.asarray(run(state, ids))


def compare(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Max |difference| and mean KL(reference || logits) per token."""
    if reference.shape != logits.shape:
        raise VerifyError(f"verification failed: PyTorch logits have shape {reference.shape}, JAX "
                          f"logits {logits.shape}")
    a, b = reference.astype(np.float64), logits.astype(np.float64)
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(la) * (la - lb), axis=-1)))
    return float(np.abs(a - b).max()), kl


def verify_conversion(source, model_dir, atol: float | None = None, log=print) -> dict:
    """Compare `source` (a `repo_jax.sources.Source`) with the converted `model_dir`;
    raise VerifyError above tolerance."""
    from repo_jax import params_io

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise FormatError("--verify needs torch and transformers: pip install -r "
                          "requirements-test.txt") from None
    atol = ATOL if atol is None else atol
    cfg, _ = params_io.read_meta(model_dir)
    ids = token_ids(cfg.vocab_size)
    reference, runner = torch_logits(source, cfg.replace(param_dtype="float32", dtype="float32"),
                                     ids, cfg.param_dtype)
    max_abs, kl = compare(reference, jax_logits(model_dir, ids))
    ok = max_abs <= atol and kl <= KL_TOL
    log(f"verify: max |logit diff| {max_abs:.2e}, KL {kl:.2e} on {SHAPE[0]} x {SHAPE[1]} tokens "
        f"against {runner} (tolerance {atol:g}, KL {KL_TOL:g}): {'OK' if ok else 'FAILED'}")
    if not ok:
        raise VerifyError(f"verification failed: max |logit diff| {max_abs:.3e} (tolerance "
                          f"{atol:g}), KL {kl:.3e} (tolerance {KL_TOL:g}); the conversion is wrong "
                          "for this checkpoint, nothing was written")
    return {"max_abs_diff": max_abs, "kl": kl, "reference": runner}
