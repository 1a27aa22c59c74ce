"""Helpers for the training tests: a tiny RePo model and learnable token files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from repo_jax.config import TrainConfig

VOCAB = 256
# 3 layers (RoPE, then two RePo that `scan_layers` stacks), 8 heads so that tensor=8
# splits whole heads.
MODEL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 64,
         "original_max_position_embeddings": 64, "repo_start_layer": 1, "eos_token_id": 1,
         "pad_token_id": 0}


def write_tokens(path: Path, n_tokens: int, seed: int = 0, dtype=np.uint16, vocab: int = VOCAB) -> Path:
    """Raw token memmap (OLMo layout) of short 'documents' that follow a simple rule
    (next = 5 * prev + 3 mod vocab) separated by EOS=1, so that loss can fall fast."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n_tokens:
        t = int(rng.integers(2, vocab))
        for _ in range(int(rng.integers(8, 40))):
            out.append(t)
            t = (5 * t + 3) % vocab
        out.append(1)
    np.asarray(out[:n_tokens], dtype).tofile(path)
    return path


def overrides(tmp: Path, data: Path, **extra) -> list[str]:
    """CLI-style overrides for a tiny, fast run in `tmp/run`."""
    items = {"run_dir": str(tmp / "run"), "data.source": "npy", "data.paths": str(data),
             "data.token_dtype": "uint16", "data.seq_len": 32, "data.eval_fraction": 0.0, "peak_flops": 1e11,
             "batch_size": 8, "steps": 4, "log_every": 1, "eval_every": 0, "eval_batches": 2,
             "optimizer.lr": 3e-3, "schedule.warmup_steps": 0, "checkpoint.every": 2,
             "checkpoint.keep": 10, "progress": False, "tensorboard": False,
             "compilation_cache_dir": "", "z_loss": 1e-4, **extra}
    out = [f"model={json.dumps(MODEL)}"]
    out += [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in items.items()]
    return out


def cli_args(tmp: Path, data: Path, **extra) -> list[str]:
    """train.py arguments for the same run as `config` (an empty YAML: the typed defaults,
    not the CLI's default configs/tiny-repo.yaml)."""
    base = tmp / "base.yaml"
    base.write_text("{}\n")
    return ["--config", str(base), *overrides(tmp, data, **extra)]


def config(tmp: Path, data: Path, **extra) -> TrainConfig:
    return TrainConfig.load(None, overrides(tmp, data, **extra))


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r:
            out[r["step"]] = r[key]
    return out


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
    from repo_jax import params_io

    import jax

    step_dir = params_io.resolve_model_dir(run_dir)
    shapes = params_io.saved_shapes(step_dir)
    target = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    return {k: np.asarray(v) for k, v in params_io.restore_params(step_dir, target).items()}
