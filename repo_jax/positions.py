"""A picture of the positions RePo learns, as in the authors' demo: for each token
of a text (x: its index), the position a RePo layer assigns it (y), per head.
With integer positions every point would lie on the dashed diagonal.

    python -m repo_jax.positions --checkpoint DIR --text TEXT [--layer L --head H | --all-heads]
                                 --out FILE.png [--json]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from repo_jax.cli import (UserError, add_model_arguments, check_output, encode, load_from_args,
                          run, write_atomic)

# Pixels one rotated token label needs along x.
_LABEL_PX = 14


def learned_positions(model, ids: Sequence[int], layer: int) -> np.ndarray:
    """float32 [H, T]: the positions RePo layer `layer` gives each token, per head."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_positions=True)[1][layer])
    return np.asarray(forward(state, np.asarray([ids], np.int32)))[0]


def draw(positions: np.ndarray, tokens: Sequence[str], heads: Sequence[int], layer: int,
         size: tuple[int, int], dpi: int = 100) -> bytes:
    """A PNG of exactly `size` (width, height) pixels: one panel per head in `heads`."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi,
                             squeeze=False, sharex=True)
    t = len(tokens)
    index = np.arange(t)
    # Label every k-th token so that the labels of one panel do not overlap.
    step = max(1, math.ceil(t * _LABEL_PX / (size[0] / cols * 0.8)))
    for n, ax in enumerate(axes.flat):
        if n >= len(heads):
            ax.axis("off")
            continue
        z = positions[heads[n]]
        ax.plot(index, z, "o-", ms=3, lw=1, label="RePo positions")
        ax.plot(index, index, "--", color="0.6", lw=1, label="integer positions")
        # The diagonal is a reference only: the y range follows the learned positions,
        # which may span much less (an early checkpoint) or much more than the indices.
        lo, hi = float(z.min()), float(z.max())
        pad = max(0.08 * (hi - lo), 1e-3 * max(abs(lo), abs(hi), 1.0))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"layer {layer}, head {heads[n]}", fontsize=9)
        ax.grid(alpha=0.3)
        if n // cols == rows - 1 or n + cols >= len(heads):
            ax.set_xticks(index[::step], [tokens[i] for i in index[::step]], rotation=90,
                          fontsize=7)
            ax.tick_params(labelbottom=True)
        if n % cols == 0:
            ax.set_ylabel("position")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.supxlabel("token (index)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 1200x500") from None
    if not (100 <= w <= 20000 and 100 <= h <= 20000):
        raise UserError(f"--size {text!r}: width and height must be 100..20000 pixels")
    return w, h


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repo_jax.positions", description=(
        "Plot (and/or dump) the positions a RePo layer assigns to the tokens of a text."))
    add_model_arguments(parser)
    parser.add_argument("--text", required=True)
    parser.add_argument("--layer", type=int, help="a RePo layer (default: the first)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--head", type=int, help="the head to draw (default 0)")
    which.add_argument("--all-heads", action="store_true", help="a grid of every head")
    parser.add_argument("--out", help="PNG to write")
    parser.add_argument("--json", action="store_true",
                        help="also write the numbers (to OUT with .json, or stdout without --out)")
    parser.add_argument("--size", help="WIDTHxHEIGHT in pixels (default depends on the grid)")
    args = parser.parse_args(argv)
    if not args.out and not args.json:
        raise UserError("nothing to write: give --out FILE.png and/or --json")
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: the picture is a PNG; name it *.png")
    if args.out:
        check_output(args.out, "--out")
    if args.out and args.json:
        check_output(Path(args.out).with_suffix(".json"), "--out (its .json, with --json)")

    model, tokenizer = load_from_args(args)
    cfg = model.config
    if not cfg.repo_layers:
        raise UserError(f"{args.checkpoint} has no RePo layers (its layers are "
                        f"{', '.join(sorted(set(cfg.layer_schemes)))} only); learned positions "
                        "exist only in RePo checkpoints")
    layer = cfg.repo_layers[0] if args.layer is None else args.layer
    if layer not in cfg.repo_layers:
        raise UserError(f"--layer {layer} is not a RePo layer of {args.checkpoint}; its RePo "
                        f"layers are {list(cfg.repo_layers)}")
    heads = list(range(cfg.num_attention_heads)) if args.all_heads else [args.head or 0]
    if not 0 <= heads[0] < cfg.num_attention_heads:
        raise UserError(f"--head {args.head} is outside the model's {cfg.num_attention_heads} "
                        f"heads; use 0..{cfg.num_attention_heads - 1}")
    size = _size(args.size) if args.size else (
        (1400, 250 * math.ceil(len(heads) / math.ceil(math.sqrt(len(heads)))) + 150)
        if args.all_heads else (1200, 500))

    ids = encode(tokenizer, args.text, cfg.vocab_size, "--text")
    positions = learned_positions(model, ids, layer)
    tokens = [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]
    record = {"checkpoint": str(args.checkpoint), "layer": layer, "repo_layers": list(cfg.repo_layers),
              "token_ids": ids, "tokens": tokens,
              "positions": {str(h): positions[h].tolist() for h in heads}}
    if args.out:
        write_atomic(args.out, draw(positions, tokens, heads, layer, size))
        print(f"wrote {args.out} ({len(ids)} tokens, layer {layer}, "
              f"head{'s' if len(heads) > 1 else ''} {', '.join(map(str, heads))})")
        if args.json:
            path = write_atomic(Path(args.out).with_suffix(".json"), json.dumps(record, indent=1))
            print(f"wrote {path}")
    else:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
