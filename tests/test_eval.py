"""Evaluation: the multiple-choice rule, batched log-likelihoods against the model's
own logits, the shipped task files, perplexity, the NIAH generator and the CLI."""
from __future__ import annotations

import functools
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import repo_jax as rj
from repo_jax.cli import run
from repo_jax.eval import niah
from repo_jax.eval.__main__ import main
from repo_jax.eval.perplexity import perplexity, windows
from repo_jax.eval.scoring import loglikelihoods, multiple_choice
from repo_jax.eval.tasks import TASKS, Example, load_examples
from repo_jax.olmo_data import load_tokenizer
from tests.cli_checkpoints import one_line_error, save_model_dir, tiny_config, word_tokenizer


# ---- the multiple-choice rule -------------------------------------------------------------
def test_multiple_choice_rule_on_a_hand_made_example():
    """One token per character; a fake model whose log-likelihoods are chosen so that
    the raw sum, the per-token and the per-character rules disagree."""
    def encode(text):
        return [ord(c) for c in text]

    # continuation -> summed log-likelihood (tokens = characters incl. the space)
    table = {" a": -2.0, " bbbbbbb": -7.0, " ccc": -3.2}
    scored = []

    def fake_loglik(requests):
        scored.extend(requests)
        sums = [table["".join(map(chr, cont))] for _, cont in requests]
        return np.asarray(sums), np.asarray([len(c) for _, c in requests])

    examples = [Example(("Q:",) * 3, (" a", " bbbbbbb", " ccc"), label) for label in (0, 1, 2)]
    metrics = multiple_choice(examples, encode, fake_loglik)
    # raw: a (-2) wins; per token: a -1, b -0.875, c -0.8 -> c; per character (without
    # the space): a -2, b -1.0, c -1.067 -> b. Each label is right under one rule only.
    assert metrics == {"acc": 1 / 3, "acc_per_token": 1 / 3, "acc_per_char": 1 / 3}
    assert multiple_choice(examples[1:2], encode, fake_loglik)["acc_per_char"] == 1.0
    assert scored[0] == (encode("Q:"), encode(" a"))


# ---- batched log-likelihoods ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    return rj.Olmo2Model(tiny_config(), rngs=nnx.Rngs(3))


def _direct_loglik(model, context, continuation):
    """log p(continuation | context) from one forward of the plain sequence, token by
    token. (Zeros after it fill a fixed 64-slot buffer, so that one compilation serves
    all calls; with causal attention they cannot change the logits before them.)"""
    ids = np.zeros((1, 64), np.int32)
    ids[0, :len(context) + len(continuation)] = list(context) + list(continuation)
    graphdef, state = nnx.split(model)
    logits = _forward(graphdef, state, ids)
    logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
    return sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(continuation))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def test_batched_loglikelihoods_equal_direct_computation(tiny_model):
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 128, n).tolist(), rng.integers(0, 128, m).tolist())
                for n, m in ((3, 1), (10, 4), (1, 7), (25, 2), (6, 6))]
    sums, counts = loglikelihoods(tiny_model, requests, batch_size=2)
    want = [_direct_loglik(tiny_model, c, x) for c, x in requests]
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(counts, [1, 4, 7, 2, 6])
    # Truncation keeps the end: the context loses tokens from the left.
    long = (rng.integers(0, 128, 40).tolist(), rng.integers(0, 128, 3).tolist())
    got, _ = loglikelihoods(tiny_model, [long], max_length=16)
    want = _direct_loglik(tiny_model, long[0][-(16 - 2):], long[1])
    np.testing.assert_allclose(got, [want], rtol=1e-5, atol=1e-4)


# ---- the shipped task files ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_file_builds_valid_examples(name):
    examples = load_examples(name)
    assert len(examples) >= 100
    for ex in examples:
        assert len(ex.contexts) == len(ex.continuations) >= 2
        assert 0 <= ex.label < len(ex.continuations)
        assert all(c.startswith(" ") and c.strip() for c in ex.continuations)
        assert all(ctx.strip() for ctx in ex.contexts)


def test_task_prompts_follow_olmo_formats():
    arc = load_examples("arc_easy", 1)[0]
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert arc.label == 0
    boolq = load_examples("boolq", 1)[0]  # answer False -> " no"
    assert boolq.continuations == (" yes", " no") and boolq.label == 1
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    wino = load_examples("winogrande", 1)[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.label == 1
    copa = load_examples("copa", 1)[0]
    assert copa.contexts[0] == "The man turned on the faucet therefore"
    assert copa.continuations == (" the toilet filled with water.", " water flowed from the spout.")
    assert copa.label == 1
    assert load_examples("social_iqa", 1)[0].label == 2  # label "3", 1-based
    assert load_examples("sciq", 1)[0].continuations[3] == " darwin"


# ---- perplexity ------------------------------------------------------------------------------
def test_windows_score_every_token_but_the_first_once():
    tokens = list(range(23))
    for length in (2, 5, 23, 100):
        reqs = windows(tokens, length)
        assert all(len(c) + len(x) - 1 <= length for c, x in reqs)
        assert [t for _, x in reqs for t in x] == tokens[1:]


def test_perplexity_equals_exp_mean_nll(tiny_model, tmp_path):
    from repo_jax.eval.perplexity import read_documents

    tok = word_tokenizer()
    docs = ["the sun is yellow and the sky is blue .", "he ran to the open door ."]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs) + "\n")
    read = read_documents(tmp_path / "docs.jsonl", "body")
    assert read == docs

    def encode(text):
        return tok.encode(text).ids

    def loglik(reqs):
        return loglikelihoods(tiny_model, reqs, batch_size=4)

    got = perplexity(read, encode, loglik, length=64)
    ids = [encode(d) for d in docs]
    nll = -sum(_direct_loglik(tiny_model, x[:1], x[1:]) for x in ids)
    n = sum(len(x) - 1 for x in ids)
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(d) for d in docs), rel=1e-4)
    # Short windows lose context, so perplexity changes, but the same tokens are scored.
    short = perplexity(read, encode, loglik, length=3)
    assert short["tokens"] == n and short["perplexity"] != pytest.approx(got["perplexity"])


# ---- needle in a haystack -----------------------------------------------------------------
@pytest.fixture(scope="module")
def count_tokens():
    tok = load_tokenizer()
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def test_niah_samples_are_deterministic(count_tokens):
    args = (count_tokens, [300, 600], [0.0, 0.5, 1.0], 3, 2)
    a = niah.make_samples(*args, seed=7)
    assert a == niah.make_samples(*args, seed=7)
    b = niah.make_samples(*args, seed=8)
    assert [s.value for s in a] != [s.value for s in b]
    assert len(a) == 2 * 3 * 2
    assert len({s.prompt for s in a}) == len(a)


@pytest.mark.parametrize("length", [256, 2000])
def test_niah_sample_structure(count_tokens, length):
    for depth in (0.0, 0.3, 1.0):
        s = niah.make_sample(count_tokens, length, depth, num_needles=4, seed=1)
        assert length - 40 <= count_tokens(s.prompt) <= length
        assert len({k for k, _ in s.needles}) == 4 and (s.key, s.value) == s.needles[0]
        assert len(s.value) == 7 and s.value.isdigit()
        for key, value in s.needles:  # each needle exactly once, with its own value
            assert s.prompt.count(niah.NEEDLE.format(key=key, value=value)) == 1
            assert s.prompt.count(key) == (3 if key == s.key else 1)  # + twice in the question
        assert s.prompt.endswith(niah.QUESTION.format(key=s.key))
        haystack = s.prompt[len(niah.INTRO):-len(niah.QUESTION.format(key=s.key))]
        where = haystack.index(niah.NEEDLE.format(key=s.key, value=s.value)) / len(haystack)
        assert abs(where - depth) < 0.1


def test_niah_scoring_is_exact_match_of_the_first_number():
    s = niah.NiahSample("p", "calm-river", "4272470", 0.5, (("calm-river", "4272470"),), 100)
    assert niah.is_correct(s, " 4272470.\nWhat")
    assert not niah.is_correct(s, " 42724701")
    assert not niah.is_correct(s, " 1234 and then 4272470")
    assert not niah.is_correct(s, " no idea")


# ---- command line ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("eval") / "model", tiny_config())


def test_cli_multiple_choice_prints_table_and_writes_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "copa.json"
    assert run(main, ["--checkpoint", str(checkpoint), "--task", "copa", "--limit", "6",
                      "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    metrics = summary["metrics"]
    assert summary["task"] == "copa" and metrics["examples"] == 6
    header, values = printed.splitlines()[:2]
    assert header.split() == ["task", "examples", "acc", "acc_per_token", "acc_per_char", "olmo_metric"]
    assert values.split()[2] == f"{metrics['acc']:.4f}"
    # The CLI's numbers are the library's on the same model and tokenizer.
    model, tok = rj.load_model(checkpoint), word_tokenizer()
    want = multiple_choice(load_examples("copa", 6), lambda t: tok.encode(t).ids,
                           lambda reqs: loglikelihoods(model, reqs))
    assert {k: metrics[k] for k in want} == pytest.approx(want)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_cli_niah_and_perplexity_run(checkpoint, tmp_path, capsys):
    assert run(main, ["--checkpoint", str(checkpoint), "--task", "niah", "--context-lengths",
                      "60", "--depths", "0,1", "--samples", "1", "--batch-size", "2",
                      "--output", str(tmp_path / "niah.json")]) == 0
    metrics = json.loads((tmp_path / "niah.json").read_text())["metrics"]
    assert metrics["examples"] == 2 and [c["depth"] for c in metrics["cells"]] == [0.0, 1.0]
    text = tmp_path / "doc.txt"
    text.write_text("the sun is yellow and the sky is blue . " * 5)
    assert run(main, ["--checkpoint", str(checkpoint), "--task", "perplexity", "--file",
                      str(text), "--output", str(tmp_path / "ppl.json")]) == 0
    assert json.loads((tmp_path / "ppl.json").read_text())["metrics"]["tokens"] == 49


@pytest.mark.parametrize("args,needle", [
    (["--task", "mmlu"], "--task 'mmlu' is not a task"),
    (["--task", "perplexity"], "--task perplexity needs --file"),
    (["--task", "perplexity", "--file", "/nonexistent.jsonl"], "--file /nonexistent.jsonl: no such file"),
    (["--task", "niah", "--depths", "0,2"], "depths in [0, 1]"),
    (["--task", "copa", "--limit", "0"], "--limit 0"),
])
def test_cli_refusals(checkpoint, capsys, tmp_path, args, needle):
    assert run(main, ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "x.json"),
                      *args]) == 2
    assert needle in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()
