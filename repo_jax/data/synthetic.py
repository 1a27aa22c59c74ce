"""Synthetic tasks for controlled experiments (`data.source: synthetic`).

Every example is a pure function of (seed, index), generated when it is read: a
context, then `num_queries` questions each followed by its answer tokens (several
supervised answers per sequence, as in Zoology's MQAR), then padding to the row
width. The loss mask is 1 on the answer tokens only. Three tasks, over a small task
vocabulary whose first `FIRST_SYMBOL` ids are markers and the rest content symbols:

* `recall` (noisy associative recall, after RULER's NIAH): `num_pairs` key-value
  pairs (`key_len` / `value_len` symbols, `k k : v v ,`) scattered among
  distractors, then `num_queries` queries `? k k :` each followed by its value.
  Distractors are random symbols and near-miss pairs, whose key differs from an
  asked key in one symbol. The noise ratio is the share of the context (everything
  before the first `?`) that is distractors.
* `lookup` (structured lookup): a header of column names, then `rows` rows
  `| rowkey cell ... cell`, then `num_queries` queries `? rowkey column =`, each
  followed by its cell.
* `induction` (copy past the trained length): random symbols, then `num_queries`
  times `?` and a bigram that occurs exactly once in them; the answer is the two
  symbols that followed it. Evaluated at 1x, 2x and 4x the training length.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repo_jax.config import SyntheticConfig
from repo_jax.data.sources import DataError, Instances

PAD, BOS, KV, END, QUERY, ROW, HEADER, EQUALS = range(8)
FIRST_SYMBOL = 8
MARKERS = ("_", "^", ":", ",", "?", "|", "#", "=")
TASKS = ("recall", "lookup", "induction")


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray                      # int32: context, then each query and its answer
    spans: tuple[tuple[int, int], ...]      # [start, end) of every answer in `tokens`

    @property
    def answers(self) -> list[np.ndarray]:
        return [self.tokens[a:b] for a, b in self.spans]


def _example(context, queries) -> Example:
    """`context`, then every (question, answer) of `queries` in turn (as in Zoology's
    multi-query associative recall: several supervised answers per sequence)."""
    parts, spans, at = [np.asarray(context, np.int32)], [], len(context)
    for question, answer in queries:
        parts += [np.asarray(question, np.int32), np.asarray(answer, np.int32)]
        at += len(question)
        spans.append((at, at + len(answer)))
        at += len(answer)
    return Example(np.concatenate(parts).astype(np.int32), tuple(spans))


def token_names(tokens) -> list[str]:
    """Readable labels: markers as punctuation, content symbols as s<N>."""
    return [MARKERS[t] if t < FIRST_SYMBOL else f"s{t - FIRST_SYMBOL}" for t in map(int, tokens)]


def _symbols(rng: np.random.Generator, cfg: SyntheticConfig, n: int) -> np.ndarray:
    return rng.integers(FIRST_SYMBOL, cfg.vocab_size, n).astype(np.int32)


def _distinct(rng: np.random.Generator, cfg: SyntheticConfig, count: int, length: int) -> np.ndarray:
    """`count` distinct tuples of `length` symbols, int32 [count, length]."""
    space = cfg.vocab_size - FIRST_SYMBOL
    if space ** length < count:
        raise DataError(f"data.synthetic: {count} distinct {length}-symbol keys need more than "
                        f"{space} symbols; raise data.synthetic.vocab_size")
    while True:
        out = _symbols(rng, cfg, count * length).reshape(count, length)
        if len({tuple(r) for r in out}) == count:
            return out


def recall(rng: np.random.Generator, cfg: SyntheticConfig, noise: float) -> Example:
    """Noisy associative recall at noise ratio `noise` (share of distractor tokens in the
    context), then `num_queries` distinct keys asked in turn."""
    k, v, pairs = cfg.key_len, cfg.value_len, cfg.num_pairs
    pair_len = k + v + 2
    keys = _distinct(rng, cfg, pairs + 1, k)[:pairs]
    values = _symbols(rng, cfg, pairs * v).reshape(pairs, v)
    queried = rng.permutation(pairs)[:min(cfg.num_queries, pairs)]
    n_noise = int(round(pairs * pair_len * noise / (1.0 - noise)))
    n_near = int(n_noise * cfg.near_miss) // pair_len
    blocks = [np.concatenate([keys[i], [KV], values[i], [END]]) for i in range(pairs)]
    real = {tuple(r) for r in keys}
    for _ in range(n_near):
        asked = int(rng.choice(queried))
        while True:  # an asked key with one symbol changed, and not another real key
            near = keys[asked].copy()
            near[rng.integers(k)] = _symbols(rng, cfg, 1)[0]
            if tuple(near) not in real:
                break
        blocks.append(np.concatenate([near, [KV], _symbols(rng, cfg, v), [END]]))
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    # Random symbols fill the gaps between blocks (never inside one).
    n_fill = n_noise - n_near * pair_len
    cuts = np.sort(rng.integers(0, n_fill + 1, len(blocks)))
    gaps = np.diff(np.concatenate([[0], cuts, [n_fill]]))
    parts = [np.asarray([BOS])]
    for gap, block in zip(gaps, blocks):
        parts += [_symbols(rng, cfg, int(gap)), block]
    parts.append(_symbols(rng, cfg, int(gaps[-1])))
    return _example(np.concatenate(parts), [(np.concatenate([[QUERY], keys[i], [KV]]), values[i])
                                            for i in queried])


def recall_length(cfg: SyntheticConfig, noise: float) -> int:
    pair_len = cfg.key_len + cfg.value_len + 2
    n_noise = int(round(cfg.num_pairs * pair_len * noise / (1.0 - noise)))
    queries = min(cfg.num_queries, cfg.num_pairs)
    return 1 + cfg.num_pairs * pair_len + n_noise + queries * (2 + cfg.key_len + cfg.value_len)


def lookup(rng: np.random.Generator, cfg: SyntheticConfig, rows: int) -> Example:
    """A `rows` x num_columns table (header of column names in a random order), then
    `num_queries` distinct (row, column) cells asked in turn."""
    cols = cfg.num_columns
    names = _distinct(rng, cfg, cols, 1)[:, 0]
    row_keys = _distinct(rng, cfg, rows, 1)[:, 0]
    cells = _symbols(rng, cfg, rows * cols).reshape(rows, cols)
    parts = [[BOS, HEADER], names]
    for i in range(rows):
        parts += [[ROW, row_keys[i]], cells[i]]
    asked = rng.permutation(rows * cols)[:min(cfg.num_queries, rows * cols)]
    return _example(np.concatenate(parts), [([QUERY, row_keys[i // cols], names[i % cols], EQUALS],
                                             [cells[i // cols, i % cols]]) for i in asked])


def lookup_length(cfg: SyntheticConfig, rows: int) -> int:
    queries = min(cfg.num_queries, rows * cfg.num_columns)
    return 2 + cfg.num_columns + rows * (2 + cfg.num_columns) + queries * 5


def induction(rng: np.random.Generator, cfg: SyntheticConfig, length: int) -> Example:
    """`length` tokens in all: random symbols, then `num_queries` times `?`, a bigram
    seen exactly once in them (a different one each time) and its 2 successors."""
    q = cfg.num_queries
    n = length - 1 - 5 * q  # BOS, context, then per query: ?, bigram, 2 answer tokens
    if n < 3 + q:
        raise DataError(f"induction with {q} queries needs at least {4 + 6 * q} tokens, "
                        f"got length={length}")
    while True:
        ctx = _symbols(rng, cfg, n)
        pairs = ctx[:-1].astype(np.int64) * cfg.vocab_size + ctx[1:]
        counts = np.unique(pairs, return_counts=True)
        once = set(counts[0][counts[1] == 1].tolist())
        starts = [p for p in range(n - 3) if int(pairs[p]) in once]
        if len(starts) >= q:
            break
    chosen = rng.permutation(starts)[:q]
    return _example(np.concatenate([[BOS], ctx]),
                    [([QUERY, ctx[p], ctx[p + 1]], ctx[p + 2:p + 4]) for p in chosen])


def induction_min_length(cfg: SyntheticConfig) -> int:
    return 4 + 6 * cfg.num_queries


def training_example(cfg: SyntheticConfig, seq_len: int, seed: int, index: int) -> Example:
    """Example `index` of the stream `seed`: task, noise, rows and length drawn here."""
    rng = np.random.default_rng([seed, index])
    task = cfg.task if cfg.task != "mix" else TASKS[int(rng.integers(len(TASKS)))]
    if task == "recall":
        top = cfg.max_noise
        while recall_length(cfg, top) > seq_len and top > 0:  # the noise that fits seq_len
            top = round(top - 0.01, 2)
        return recall(rng, cfg, float(rng.uniform(0.0, top)))
    if task == "lookup":
        fits = [r for r in range(cfg.min_rows, cfg.max_rows + 1) if lookup_length(cfg, r) <= seq_len]
        return lookup(rng, cfg, int(rng.choice(fits)))
    low = max(induction_min_length(cfg), int(cfg.min_length * seq_len))
    return induction(rng, cfg, int(rng.integers(low, seq_len + 1)))


def pack(examples: list[Example], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `width` tokens (answers right after their prompts, PAD after) and the
    float32 loss mask, 1 on answer tokens."""
    tokens = np.full((len(examples), width), PAD, np.int32)
    mask = np.zeros((len(examples), width), np.float32)
    for row, ex in enumerate(examples):
        t = ex.tokens
        if len(t) > width:
            raise DataError(f"a synthetic example of {len(t)} tokens does not fit in {width}; "
                            "raise data.seq_len or lower the task's sizes")
        tokens[row, :len(t)] = t
        for a, b in ex.spans:
            mask[row, a:b] = 1.0
    return tokens, mask


class SyntheticTasks(Instances):
    """`num` examples of the stream `seed`, each generated when read."""

    def __init__(self, cfg: SyntheticConfig, seq_len: int, seed: int, num: int, what: str):
        super().__init__(seq_len, num, f"synthetic {cfg.task} ({what}, seed {seed})")
        self.cfg, self.seed = cfg, seed
        if cfg.vocab_size <= FIRST_SYMBOL + 1:
            raise DataError(f"data.synthetic.vocab_size={cfg.vocab_size} leaves no content "
                            f"symbols; use more than {FIRST_SYMBOL + 1}")

    def read_masked(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        examples = [training_example(self.cfg, self.seq_len, self.seed, int(i))
                    for i in np.asarray(indices)]
        return pack(examples, self.seq_len)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.read_masked(indices)[0]


def open_synthetic(cfg: SyntheticConfig, seq_len: int) -> tuple[SyntheticTasks, SyntheticTasks]:
    """(train, eval): the same task distribution from two seeds."""
    return (SyntheticTasks(cfg, seq_len, cfg.seed, cfg.num_examples, "train"),
            SyntheticTasks(cfg, seq_len, cfg.eval_seed, cfg.num_eval_examples, "eval"))
