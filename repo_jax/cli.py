"""What the `generate`, `eval` and `positions` command lines share: a checkpoint
with its tokenizer, user errors as one line on stderr, and atomic result files."""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from repo_jax.config import ATTENTION_IMPLS, ConfigError
from repo_jax.hf_format import FormatError


class UserError(ValueError):
    """Bad input from the command line; the message names it and the fix."""


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run `main`, turning user errors into one stderr line and exit status 2."""
    try:
        return main(argv)
    except (UserError, FormatError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def tokenizer_path(checkpoint: str | os.PathLike, resolved: Path | None = None) -> Path | None:
    """The checkpoint's own tokenizer.json (in DIR, or in `resolved`, the model directory
    a run directory resolves to), or None to use the dolma2 default."""
    checkpoint = Path(checkpoint)
    for folder in (checkpoint, resolved):
        if folder is not None and (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=(
        "Hugging Face, repo-jax model or training run directory (its latest checkpoint)"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                        help="override the checkpoint's; 'blockwise' for long contexts")
    parser.add_argument("--rope-scaling-factor", type=float,
                        help="YaRN factor over the checkpoint's original_max_position_embeddings")


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) for the options of `add_model_arguments`."""
    overrides = {name: value for name, value in (
        ("attention_impl", args.attention_impl),
        ("rope_scaling_factor", args.rope_scaling_factor)) if value is not None}
    if args.attention_impl is not None:
        check_attention_impl(args.attention_impl, "--attention-impl")
    if args.rope_scaling_factor is not None and not math.isfinite(args.rope_scaling_factor):
        raise UserError(f"--rope-scaling-factor {args.rope_scaling_factor}: must be a number "
                        ">= 1")
    return load_checkpoint(args.checkpoint, args.dtype, **overrides)


def check_attention_impl(impl: str, what: str) -> None:
    """Refuse a kernel this machine's JAX platform cannot run, before compiling it."""
    import jax

    platform = jax.devices()[0].platform
    if impl == "cudnn" and platform not in ("gpu", "cuda"):
        raise UserError(f"{what}{'' if what.endswith('=') else ' '}cudnn needs an NVIDIA GPU, "
                        f"but JAX runs on {platform} here; use xla or blockwise")
    # A run trained on TPU pods saves attention_impl="splash", which only TPUs run.
    if impl == "splash" and platform != "tpu":
        raise UserError(f"{what}{'' if what.endswith('=') else ' '}splash is the TPU kernel, "
                        f"but JAX runs on {platform} here; pass --attention-impl xla (or "
                        "blockwise for long contexts)")


def load_checkpoint(checkpoint: str | os.PathLike, dtype: str = "float32", **overrides):
    """(model, tokenizer) for any `repo_jax.load_model`-able directory."""
    from repo_jax import params_io
    from repo_jax.loading import load_model
    from repo_jax.olmo_data import load_tokenizer

    if not Path(checkpoint).exists():
        raise UserError(f"--checkpoint {checkpoint}: no such directory")
    # Resolved (and so verified) once: a run directory's newest good step.
    resolved = params_io.resolve_model_dir(checkpoint) if Path(checkpoint).is_dir() else None
    model = (params_io.load_model_dir(resolved, dtype, **overrides) if resolved is not None
             else load_model(checkpoint, dtype, **overrides))
    check_attention_impl(model.config.attention_impl, f"{checkpoint}: attention_impl=")
    path = tokenizer_path(checkpoint, resolved)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise UserError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]}); "
                        "replace it with the model's tokenizer.json or remove it to use "
                        "dolma2") from None
    return model, tokenizer


def check_output(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output path that cannot become a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file path")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: {folder} is a file, not a directory; give another path")
    return path


def encode(tokenizer, text: str, vocab_size: int, what: str = "text") -> list[int]:
    """Token ids of `text` as the tokenizer's template gives them (with BOS if it adds
    one), refused when the tokenizer does not fit the model."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise UserError(f"{what} is empty after tokenization; give some text")
    if max(ids) >= vocab_size:
        raise UserError(f"{what} has token id {max(ids)} but the model's vocab_size is "
                        f"{vocab_size}; put the tokenizer.json the model was trained with in "
                        "the checkpoint directory")
    return ids


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write via a temporary file next to `path` and rename, so that a failure
    never leaves half a file behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, file-size limit, a directory in the way
            raise UserError(f"{path}: cannot write it ({e.strerror or e}); nothing was "
                            "written") from None
        raise
    return path
