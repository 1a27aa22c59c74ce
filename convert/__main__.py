"""python -m convert import SRC DST [--dtype float32|bfloat16] [--verify] [--overwrite]
python -m convert export SRC DST [--dtype float32|bfloat16] [--shard-size 5GB] [--overwrite]

User errors end with one line on stderr and exit status 1; nothing is left at DST.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from convert.exporter import DEFAULT_SHARD_SIZE
from convert.importer import DTYPES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="PyTorch OLMo-2 / RePo checkpoints <-> repo-jax (Orbax)")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import",
                         help="HF or OLMo checkpoint directory -> repo-jax model directory")
    imp.add_argument("src", help="HF dir (config.json + safetensors or pytorch_model.bin) or "
                                 "OLMo dir (config.yaml + model.safetensors or model.pt)")
    imp.add_argument("dst", help="repo-jax model directory to create")
    imp.add_argument("--dtype", choices=DTYPES,
                     help="parameter dtype (default: the source's, if all tensors share one)")
    imp.add_argument("--verify", action="store_true",
                     help="compare logits of the source in PyTorch and the result in JAX")
    imp.add_argument("--atol", type=float, default=None,
                     help="--verify tolerance on max |logit difference| (default 1e-3)")
    imp.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    exp = sub.add_parser("export", help="repo-jax model or training run directory -> HF directory")
    exp.add_argument("src", help="repo-jax model directory, or a run directory (latest checkpoint)")
    exp.add_argument("dst", help="Hugging Face directory to create")
    exp.add_argument("--dtype", choices=DTYPES, help="dtype of the tensors (default: as saved)")
    exp.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                     help=f"largest safetensors shard (default {DEFAULT_SHARD_SIZE})")
    exp.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    show = warnings.showwarning

    def one_line(message, category, *rest):
        # A checkpoint read with a warning (repo_jax.pe_config) says so in one line.
        from repo_jax.pe_config import PeConfigWarning

        if issubclass(category, PeConfigWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    # Imported here so that --help answers without loading JAX.
    from convert.exporter import export_model
    from convert.importer import import_checkpoint
    from convert.verify import VerifyError
    from repo_jax.config import ConfigError
    from repo_jax.hf_format import FormatError

    try:
        if args.command == "import":
            import_checkpoint(args.src, args.dst, args.dtype, overwrite=args.overwrite,
                              verify=args.verify, atol=args.atol)
        else:
            export_model(args.src, args.dst, args.dtype, shard_size=args.shard_size,
                         overwrite=args.overwrite)
    except (FormatError, ConfigError, VerifyError) as e:
        return _fail(str(e))
    except OSError as e:  # disk full, permissions: the system's words, with the file
        return _fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", 130)
    return 0


def _fail(message: str, code: int = 1) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
