"""Perplexity of a model on a text file (one document) or a JSONL file (one
document per line, its text under `text_key`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

from repo_jax.cli import UserError
from repo_jax.eval.scoring import LoglikFn, Request


def read_documents(path: str | Path, text_key: str = "text") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-save the file as "
                        "UTF-8") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise UserError(f"{path}:{n}: no string field {text_key!r}; choose the field with "
                            "--text-key")
        docs.append(record[text_key])
    return docs


def windows(tokens: Sequence[int], length: int) -> list[Request]:
    """Cut a document into requests of at most `length` model inputs so that every
    token but the first is scored exactly once, each window opening on the last
    token of the previous one."""
    return [(tokens[s:s + 1], tokens[s + 1:s + length]) for s in range(0, len(tokens) - 1, length - 1)]


def perplexity(docs: Sequence[str], encode: Callable[[str], list[int]], loglik: LoglikFn,
               length: int) -> dict[str, float]:
    """Token-level perplexity, mean negative log-likelihood (nats per token) and bits
    per UTF-8 byte over the documents (documents shorter than two tokens are skipped)."""
    requests, scored_bytes = [], 0
    for doc in docs:
        tokens = encode(doc)
        if len(tokens) >= 2:
            requests += windows(tokens, length)
            scored_bytes += len(doc.encode("utf-8"))
    if not requests:
        raise UserError("the file has no document of two or more tokens; nothing to score")
    sums, counts = loglik(requests)
    nll, n = -float(sums.sum()), int(counts.sum())
    return {"perplexity": math.exp(nll / n), "nll_per_token": nll / n,
            "bits_per_byte": nll / math.log(2) / scored_bytes, "tokens": n, "documents": len(docs)}
