"""Synthetic tasks (`data.source: synthetic`), the masked loss, and their scoring."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from repo_jax.config import ConfigError, SyntheticConfig, TrainConfig
from repo_jax.data import synthetic as syn
from repo_jax.train.loss import lm_loss

CFG = SyntheticConfig()
MULTI = SyntheticConfig(num_queries=4, num_pairs=6)


def _queries(ex: syn.Example, question_len: int):
    """(question tokens, answer tokens) of every query of `ex`."""
    return [(ex.tokens[a - question_len:a], ex.tokens[a:b]) for a, b in ex.spans]


@pytest.mark.parametrize("cfg", [CFG, MULTI])
def test_examples_are_a_function_of_seed_and_index(cfg):
    a = syn.SyntheticTasks(cfg, 128, 0, 100, "train").read_masked(np.arange(20))
    b = syn.SyntheticTasks(cfg, 128, 0, 100, "train").read_masked(np.arange(20))
    other = syn.SyntheticTasks(cfg, 128, 1, 100, "eval").read_masked(np.arange(20))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], other[0])
    assert a[0].dtype == np.int32 and a[1].dtype == np.float32
    assert a[0].max() < cfg.vocab_size
    # The mask covers exactly the answers, the last one followed only by padding.
    for i in range(20):
        ex = syn.training_example(cfg, 128, 0, i)
        assert 1 <= len(ex.spans) <= cfg.num_queries
        where = np.flatnonzero(a[1][i])
        assert list(where) == [t for s, e in ex.spans for t in range(s, e)]
        np.testing.assert_array_equal(a[0][i, where], np.concatenate(ex.answers))
        assert ex.spans[-1][1] == len(ex.tokens)
        assert (a[0][i, len(ex.tokens):] == syn.PAD).all()


@pytest.mark.parametrize("cfg", [SyntheticConfig(near_miss=0.5),
                                 SyntheticConfig(near_miss=0.5, num_pairs=6, num_queries=4)])
def test_recall_noise_ratio_near_misses_and_answers(cfg):
    rng = np.random.default_rng(3)
    k, v = cfg.key_len, cfg.value_len
    for noise in (0.0, 0.4, 0.8):
        ex = syn.recall(rng, cfg, noise)
        t = ex.tokens
        assert len(t) == syn.recall_length(cfg, noise)
        queries = _queries(ex, k + 2)
        assert len(queries) == min(cfg.num_queries, cfg.num_pairs)
        context = t[1:ex.spans[0][0] - k - 2]
        seps = np.flatnonzero(context == syn.KV)
        keys = [tuple(context[s - k:s]) for s in seps]
        vals = [tuple(context[s + 1:s + 1 + v]) for s in seps]
        asked_keys = set()
        for question, answer in queries:
            assert question[0] == syn.QUERY and question[-1] == syn.KV
            asked = tuple(question[1:1 + k])
            exact = [i for i, key in enumerate(keys) if key == asked]
            assert len(exact) == 1 and vals[exact[0]] == tuple(answer)
            asked_keys.add(asked)
        assert len(asked_keys) == len(queries)  # every query asks another key
        near = [key for key in keys if any(sum(a != b for a, b in zip(key, q)) == 1 for q in asked_keys)]
        real_tokens = cfg.num_pairs * (k + v + 2)
        assert (len(context) - real_tokens) / len(context) == pytest.approx(noise, abs=0.02)
        if noise > 0.5:
            assert len(near) >= 1  # near-miss keys are among the distractors


@pytest.mark.parametrize("cfg", [CFG, MULTI])
def test_lookup_answers_are_the_cells_of_the_asked_rows_and_columns(cfg):
    rng = np.random.default_rng(5)
    cols = cfg.num_columns
    for rows in (2, 5):
        ex = syn.lookup(rng, cfg, rows)
        t = ex.tokens
        header = list(t[2:2 + cols])
        table = t[2 + cols:ex.spans[0][0] - 4].reshape(rows, 2 + cols)
        assert (table[:, 0] == syn.ROW).all()
        queries = _queries(ex, 4)
        assert len(queries) == min(cfg.num_queries, rows * cols)
        assert len({tuple(q[1:3]) for q, _ in queries}) == len(queries)
        for question, answer in queries:
            assert question[0] == syn.QUERY and question[3] == syn.EQUALS
            row = table[list(table[:, 1]).index(question[1])]
            assert answer[0] == row[2 + header.index(question[2])]
        assert len(t) == syn.lookup_length(cfg, rows)


@pytest.mark.parametrize("cfg", [CFG, MULTI])
def test_induction_bigrams_occur_once_and_answers_follow_them(cfg):
    rng = np.random.default_rng(7)
    for length in (32, 512):
        ex = syn.induction(rng, cfg, length)
        assert len(ex.tokens) == length
        ctx = ex.tokens[1:ex.spans[0][0] - 3]
        queries = _queries(ex, 3)
        assert len(queries) == cfg.num_queries
        assert len({tuple(q) for q, _ in queries}) == len(queries)
        for question, answer in queries:
            a, b = question[1:]
            hits = np.flatnonzero((ctx[:-1] == a) & (ctx[1:] == b))
            assert question[0] == syn.QUERY and len(hits) == 1
            np.testing.assert_array_equal(ctx[hits[0] + 2:hits[0] + 4], answer)


def test_score_is_exact_match_per_query():
    """A model right on one query of two scores 50%, not 0% (per example) or 75% (per token)."""
    from repo_jax.eval.synthetic import score

    ex = syn.Example(np.asarray([1, 8, 9, 4, 10, 11, 4, 12, 13], np.int32), ((4, 6), (7, 9)))

    class Oracle(nnx.Module):  # predicts token t+1 at t, except the last answer token
        def __call__(self, tokens):
            nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], 1).at[:, 7].set(0)
            return jax.nn.one_hot(nxt, 16) * 10.0

    result = score(Oracle(), [ex, ex], batch_size=2)
    assert result["queries"] == 4 and result["accuracy"] == 0.5


def test_config_keys_and_errors():
    cfg = TrainConfig.load(None, ["data.source=synthetic", "data.synthetic.task=recall",
                                  "data.synthetic.max_noise=0.5"])
    assert cfg.data.synthetic == SyntheticConfig(task="recall", max_noise=0.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="data.synthetic.task='copy'"):
        TrainConfig.load(None, ["data.synthetic.task=copy"])
    with pytest.raises(ConfigError, match="eval_seed=0 equals seed"):
        TrainConfig.load(None, ["data.synthetic.eval_seed=0"])
    with pytest.raises(ConfigError, match="num_queries=0 must be at least 1"):
        TrainConfig.load(None, ["data.synthetic.num_queries=0"])
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.load(None, ["data.synthetic.noise=0.5"])


class MaskedLossTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_loss_is_the_mean_over_masked_targets(self):
        rng = np.random.default_rng(1)
        logits = jnp.asarray((rng.normal(size=(2, 6, 9)) * 3).astype(np.float32))
        tokens = jnp.asarray(rng.integers(0, 9, size=(2, 6)).astype(np.int32))
        mask = np.zeros((2, 6), np.float32)
        mask[0, 4:] = 1
        mask[1, 2] = 1
        ce, z = self.variant(lm_loss)(logits, tokens, jnp.asarray(mask))
        lp = jax.nn.log_softmax(logits[:, :-1])
        picked = [(0, 3, 4), (0, 4, 5), (1, 1, 2)]  # (row, logit position, target position)
        want = -np.mean([lp[b, p, tokens[b, t]] for b, p, t in picked])
        lse = jax.nn.logsumexp(logits[:, :-1], -1)
        assert float(ce) == pytest.approx(float(want), rel=1e-6)
        assert float(z) == pytest.approx(float(np.mean([lse[b, p] ** 2 for b, p, _ in picked])), rel=1e-6)
        full_ce, full_z = self.variant(lm_loss)(logits, tokens, jnp.ones((2, 6)))
        plain_ce, plain_z = self.variant(lm_loss)(logits, tokens)
        assert float(full_ce) == pytest.approx(float(plain_ce), rel=1e-6)
        assert float(full_z) == pytest.approx(float(plain_z), rel=1e-6)


def test_masked_accumulation_weights_micro_batches_by_their_targets():
    """grad_accum=2 on a masked batch whose halves hold 5 and 1 targets gives the
    step of grad_accum=1: the mean over all six targets, not the mean of two means."""
    from repo_jax import sharding as shd
    from repo_jax.train import TrainState
    from repo_jax.train.optimizer import make_optimizer, schedule
    from repo_jax.train.state import init_params, model_spec
    from repo_jax.train.step import make_train_step, opt_state_shardings

    cfg = TrainConfig.load(None, ["model.preset=tiny", "model.vocab_size=64",
                                  "model.layer_schemes=[rope,repo]", "model.num_hidden_layers=2",
                                  "data.source=synthetic", "data.seq_len=16", "batch_size=4"])
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    spec = model_spec(cfg.model)
    p_shard = shd.param_shardings(spec.abstract, spec.logical_axes, mesh)
    sched = schedule(cfg.schedule, cfg.optimizer.lr, cfg.steps)
    tx = make_optimizer(cfg.optimizer, sched, spec.abstract.keys())
    shardings = TrainState(shd.replicated(mesh), p_shard, opt_state_shardings(tx, spec.abstract, p_shard, mesh))
    step = make_train_step(spec, tx, sched, cfg.z_loss, mesh, shardings)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
    mask = np.zeros((4, 16), np.float32)
    mask[0, 3:6], mask[1, 10:12], mask[3, 7] = 1, 1, 1

    def run(accum):
        params = init_params(spec, 0, p_shard)
        state = TrainState(jnp.int32(0), params, tx.init(params))
        batch = {"tokens": tokens.reshape(accum, 4 // accum, 16),
                 "loss_mask": mask.reshape(accum, 4 // accum, 16)}
        return step(state, batch)[1]

    # (Adam's first update is about lr * sign(grad), so the gradient is compared by its norm.)
    m1, m2 = run(1), run(2)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
