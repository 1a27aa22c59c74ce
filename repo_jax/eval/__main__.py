"""python -m repo_jax.eval --checkpoint DIR --task NAME [--limit N]

Prints a table of metrics and writes the same numbers as JSON (`--output`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from repo_jax.cli import (UserError, add_model_arguments, check_output, load_from_args, run,
                          write_atomic)
from repo_jax.eval.perplexity import read_documents
from repo_jax.eval.runner import (SPECIAL_TASKS, make_encoder, run_multiple_choice, run_niah,
                                  run_perplexity, run_synthetic)
from repo_jax.eval.tasks import TASKS

# The longest haystack --task niah builds: 128K tokens (the RULER range); past it, one
# mistyped length would spend minutes of text generation and gigabytes before failing.
MAX_NIAH_LENGTH = 131072


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated numbers, e.g. 1024,2048") from None


def table(task: str, metrics: dict) -> str:
    """Scalar metrics as one aligned two-row table (lists such as per-cell NIAH
    scores follow as their own rows)."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    cells = {"task": task, **{k: f"{v:.4f}" if isinstance(v, float) else str(v)
                              for k, v in scalars.items()}}
    widths = {k: max(len(k), len(v)) for k, v in cells.items()}
    lines = ["  ".join(k.ljust(widths[k]) for k in cells),
             "  ".join(v.ljust(widths[k]) for k, v in cells.items())]
    for row in metrics.get("cells", []):
        lines.append(f"  context {row['context_length']:>6}  depth {row['depth']:.2f}  "
                     f"accuracy {row['accuracy']:.4f}  ({row['examples']} samples)")
    for row in metrics.get("synthetic", []):
        setting = "  ".join(f"{k} {row[k]}" for k in ("noise", "rows", "multiple", "yarn") if k in row)
        lines.append(f"  {row['task']:<9}  {setting:<22}  accuracy {row['accuracy']:.4f}  "
                     f"answer loss {row['answer_loss']:.4f}  ({row['examples']} examples, "
                     f"{row['length']} tokens)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    names = sorted(TASKS) + list(SPECIAL_TASKS)
    parser = argparse.ArgumentParser(prog="python -m repo_jax.eval", description=(
        "Evaluate a checkpoint: multiple-choice tasks (log-likelihood of each answer), "
        "perplexity on a text/JSONL file, or RULER-style needle in a haystack."))
    add_model_arguments(parser)
    parser.add_argument("--task", required=True, help=f"one of {', '.join(names)}")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples/documents")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int,
                        help="longest model input (default: max_position_embeddings; "
                             "perplexity windows default to at most 2048)")
    parser.add_argument("--output", help="JSON summary path (default: eval-TASK.json)")
    group = parser.add_argument_group("perplexity")
    group.add_argument("--file", help="a text file (one document) or .jsonl (one per line)")
    group.add_argument("--text-key", default="text", help="JSONL field holding the text")
    group = parser.add_argument_group("niah")
    group.add_argument("--context-lengths", default="1024,2048,4096",
                       help="prompt lengths in tokens, comma-separated")
    group.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                       help="needle depths in [0, 1], comma-separated")
    group.add_argument("--num-needles", type=int, default=1,
                       help="key-value needles per prompt (one is asked, the rest distract)")
    group.add_argument("--samples", type=int, default=4, help="prompts per length and depth")
    group.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("synthetic (a run trained with data.source=synthetic)")
    group.add_argument("--synthetic-tasks", default="recall,lookup,induction",
                       help="comma-separated subset of recall, lookup, induction")
    group.add_argument("--examples", type=int, default=256, help="examples per task and setting")
    group.add_argument("--train-length", type=int,
                       help="training sequence length (default: the run's data.seq_len)")
    group.add_argument("--eval-seed", type=int,
                       help="example seed (default: the run's data.synthetic.eval_seed)")
    args = parser.parse_args(argv)

    if args.task not in names:
        raise UserError(f"--task {args.task!r} is not a task; use one of {', '.join(names)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length {args.max_length}: must be at least 2 tokens")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    output = check_output(args.output or f"eval-{args.task}.json", "--output")
    if args.task == "perplexity" and not args.file:
        raise UserError("--task perplexity needs --file PATH (a text or .jsonl file)")
    # Read before the model loads, so that a bad file costs no model loading.
    docs = read_documents(args.file, args.text_key) if args.task == "perplexity" else None
    if args.task == "niah":
        lengths = _numbers(args.context_lengths, int, "--context-lengths")
        depths = _numbers(args.depths, float, "--depths")
        if not lengths or min(lengths) < 1 or not depths or not all(0 <= d <= 1 for d in depths):
            raise UserError(f"--context-lengths {args.context_lengths} / --depths {args.depths}: "
                            "need positive lengths and depths in [0, 1]")
        if max(lengths) > MAX_NIAH_LENGTH:
            raise UserError(f"--context-lengths {args.context_lengths}: {max(lengths)} tokens is over "
                            f"the {MAX_NIAH_LENGTH} this evaluation builds haystacks for; use shorter "
                            "contexts")
        if args.num_needles < 1 or args.samples < 1:
            raise UserError("--num-needles and --samples must be at least 1")

    if args.task == "synthetic":
        tasks = [t for t in args.synthetic_tasks.split(",") if t.strip()]
        bad = sorted(set(tasks) - {"recall", "lookup", "induction"})
        if bad or not tasks:
            raise UserError(f"--synthetic-tasks {args.synthetic_tasks!r}: use a comma-separated "
                            "subset of recall, lookup, induction")
        if args.examples < 1 or (args.train_length is not None and args.train_length < 10):
            raise UserError("--examples must be at least 1 and --train-length at least 10")
        from pathlib import Path

        from repo_jax.loading import load_model

        if not Path(args.checkpoint).exists():
            raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
        # The task vocabulary needs no tokenizer; YaRN rows reload with their factor.
        fixed = {k: v for k, v in (("attention_impl", args.attention_impl),
                                   ("rope_scaling_factor", args.rope_scaling_factor)) if v is not None}

        def load(**changes):
            return load_model(args.checkpoint, args.dtype, **{**fixed, **changes})

        metrics = run_synthetic(load(), load, args.checkpoint, args.train_length, args.examples,
                                args.eval_seed, args.batch_size, tasks)
        return _report(args, output, metrics)
    model, tokenizer = load_from_args(args)
    encode = make_encoder(tokenizer, model.config.vocab_size)
    if args.task == "perplexity":
        metrics = run_perplexity(model, encode, docs[:args.limit], args.batch_size,
                                 args.max_length)
    elif args.task == "niah":
        metrics = run_niah(model, tokenizer, encode, lengths, depths, args.num_needles,
                           args.samples, args.seed, args.batch_size, args.limit)
    else:
        metrics = run_multiple_choice(model, encode, args.task, args.limit, args.batch_size,
                                      args.max_length)
    return _report(args, output, metrics)


def _report(args: argparse.Namespace, output, metrics: dict) -> int:
    print(table(args.task, metrics))
    summary = {"task": args.task, "checkpoint": str(args.checkpoint), "metrics": metrics,
               "settings": {k: v for k, v in vars(args).items() if k not in ("task", "checkpoint")}}
    path = write_atomic(output, json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
