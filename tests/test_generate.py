"""Generation with the KV cache: exactly the tokens repeated full forwards choose,
left padding, EOS, sampling, and the command line."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import repo_jax as rj
from repo_jax.cli import run
from repo_jax.generate import _pick, main
from tests.cli_checkpoints import one_line_error, save_model_dir, tiny_config, word_tokenizer
from tests.conftest import SMALL


def _model(schemes, kv_heads=4, seed=0):
    cfg = rj.ModelConfig(**{**SMALL, "num_key_value_heads": kv_heads}, layer_schemes=schemes)
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(seed))
    for i in cfg.repo_layers:  # spread RePo positions over tens of units
        a = model.layers[i].self_attn
        a.final_map.kernel[...] = a.final_map.kernel[...] * 50.0
    return model


def _greedy_by_full_forwards(model, prompt, n):
    """The reference: a full forward, without cache, of the whole sequence for every new
    token. The sequence sits in a fixed-size buffer (one compilation); with causal
    attention the tokens after the current one cannot change its logits."""
    b, t = prompt.shape
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    ids = np.zeros((b, t + n), np.int32)
    ids[:, :t] = prompt
    for cur in range(t, t + n):
        ids[:, cur] = np.argmax(np.asarray(forward(state, ids))[:, cur - 1], -1)
    return ids


@pytest.mark.parametrize("schemes,kv_heads", [
    (("rope", "rope", "repo", "repo"), 4),   # RePo: positions of new tokens from their state
    (("rope", "nope", "rope", "rope"), 2),   # plain (with a NoPE layer), grouped-query
])
def test_cached_greedy_equals_repeated_full_forwards(schemes, kv_heads):
    model = _model(schemes, kv_heads)
    prompt = np.random.default_rng(0).integers(0, 256, (2, 7))
    got = rj.generate(model, prompt, 12)
    assert got.dtype == jnp.int32 and got.shape == (2, 19)
    np.testing.assert_array_equal(got, _greedy_by_full_forwards(model, prompt, 12))


def test_prefill_keeps_only_the_logits_it_needs():
    model = _model(("rope", "rope", "repo", "repo"))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    full = model.forward(ids)
    last = model.forward(ids, logits_to_keep=1)
    assert last.logits.shape == (2, 1, 256)
    np.testing.assert_allclose(last.logits, full.logits[:, -1:], atol=1e-5)
    np.testing.assert_allclose(last.positions[3], full.positions[3])  # positions stay whole


def test_left_padded_batch_equals_each_prompt_alone():
    model = _model(("rope", "rope", "repo", "repo"))
    rng = np.random.default_rng(1)
    short, long = rng.integers(0, 256, 4), rng.integers(0, 256, 9)
    batch = np.stack([np.concatenate([np.zeros(5, np.int64), short]), long])
    mask = np.stack([np.r_[np.zeros(5), np.ones(4)], np.ones(9)]).astype(np.int32)
    got = np.asarray(rj.generate(model, batch, 8, attention_mask=mask))
    np.testing.assert_array_equal(got[0, 9:], np.asarray(rj.generate(model, short[None], 8))[0, 4:])
    np.testing.assert_array_equal(got[1], np.asarray(rj.generate(model, long[None], 8))[0])
    np.testing.assert_array_equal(got[:, :9], batch)


def test_rows_stop_at_eos_and_are_padded_after():
    model = _model(("rope", "rope", "repo", "repo"))
    prompt = np.random.default_rng(2).integers(0, 256, (2, 5))
    free = np.asarray(rj.generate(model, prompt, 10, eos_id=-1))
    eos = int(free[0, 5 + 3])  # row 0's 4th new token
    stopped = np.asarray(rj.generate(model, prompt, 10, eos_id=eos))
    pad = model.config.pad_token_id
    for row in range(2):
        hits = np.flatnonzero(free[row, 5:] == eos)
        end = 5 + (hits[0] + 1 if hits.size else 10)
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == pad).all()
    assert (stopped[0, 9:] == pad).all()


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy():
    model = _model(("rope", "rope", "repo", "repo"))
    prompt = np.random.default_rng(3).integers(0, 256, (2, 5))
    a = np.asarray(rj.generate(model, prompt, 10, temperature=1.0, seed=1))
    np.testing.assert_array_equal(a, rj.generate(model, prompt, 10, temperature=1.0, seed=1))
    assert not np.array_equal(a, rj.generate(model, prompt, 10, temperature=1.0, seed=2))
    assert a.min() >= 0 and a.max() < 256
    np.testing.assert_array_equal(rj.generate(model, prompt, 10, temperature=1.0, top_p=1e-6),
                                  rj.generate(model, prompt, 10))


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: _pick(logits, k, 1.0, 0.7, False)[0])(keys))
    # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1 only, renormalised to 5/8 and 3/8.
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.625) < 0.04
    draws = np.asarray(jax.vmap(lambda k: _pick(logits * 2, k, 2.0, 1.0, False)[0])(keys))
    assert abs((draws == 3).mean() - 0.05) < 0.02  # temperature 2 undoes the doubling


def test_bad_arguments_are_refused():
    model = _model(("rope",) * 4)
    with pytest.raises(ValueError, match="outside"):
        rj.generate(model, np.array([[3, 256]]), 2)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        rj.generate(model, np.array([[3, 4]]), 2, attention_mask=np.array([[1, 0]]))
    with pytest.raises(ValueError, match="top_p"):
        rj.generate(model, np.array([[3, 4]]), 2, top_p=0.0)


# ---- command line ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("gen") / "model", tiny_config())


def test_cli_continues_the_prompt_with_the_checkpoint_tokenizer(checkpoint, capsys):
    assert run(main, ["--checkpoint", str(checkpoint), "--prompt", "the sun is",
                      "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    # The same continuation through the library: the CLI adds only tokenization.
    model = rj.load_model(checkpoint)
    tok = word_tokenizer()
    ids = tok.encode("the sun is").ids
    new = np.asarray(rj.generate(model, np.asarray([ids]), 5))[0, 3:].tolist()
    if model.config.eos_token_id in new:
        new = new[:new.index(model.config.eos_token_id)]
    assert printed == "the sun is" + tok.decode(new)


def test_cli_refuses_a_tokenizer_that_does_not_fit(tmp_path, capsys):
    bare = save_model_dir(tmp_path / "bare", tiny_config(), tokenizer=False)
    # No tokenizer.json: the dolma2 default gives ids far above the model's 128.
    assert run(main, ["--checkpoint", str(bare), "--prompt", "Hello world"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "vocab_size is 128" in line and "tokenizer.json" in line


def test_cli_refusal_exits_nonzero_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "repo_jax.generate", "--checkpoint",
                           str(tmp_path / "missing"), "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "missing: no such directory" in one_line_error(proc.stderr)
