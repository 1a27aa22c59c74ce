"""Vocabulary tiling: the chunked loss equals the whole-logits loss, values and gradients."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from repo_jax.train.loss import lm_loss
from repo_jax.train.vocab_tiling import tiled_lm_loss

B, T, D, V = 2, 13, 8, 32


def _inputs():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (B, T, D), jnp.float32)
    w = jax.random.normal(k2, (D, V), jnp.float32)
    tokens = jax.random.randint(k3, (B, T), 0, V, jnp.int32)
    return hidden, w, tokens


def _objective(chunk):
    def f(hidden, w, tokens):
        project = lambda h: jnp.einsum("btd,dv->btv", h, w)  # noqa: E731
        ce, z = (lm_loss(project(hidden), tokens) if chunk is None
                 else tiled_lm_loss(project, hidden, tokens, chunk, untiled_max_bytes=0))
        return ce + 0.1 * z, (ce, z)
    return f


class TiledLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_tiled_loss_matches_whole_logits_with_gradients(self):
        hidden, w, tokens = _inputs()
        (_, (ce_w, z_w)), g_want = jax.value_and_grad(_objective(None), (0, 1), has_aux=True)(
            hidden, w, tokens)
        for chunk in (4, 5, 13, 0):  # 4 and 5 pad the last chunk; 13 and 0: one chunk
            (_, (ce_g, z_g)), g_got = self.variant(
                jax.value_and_grad(_objective(chunk), (0, 1), has_aux=True))(hidden, w, tokens)
            np.testing.assert_allclose([ce_g, z_g], [ce_w, z_w], rtol=1e-6, err_msg=str(chunk))
            chex.assert_trees_all_close(g_got, g_want, rtol=1e-5, atol=1e-7)
            # The last position has no target: its hidden state gets no gradient.
            assert float(jnp.abs(g_got[0][:, -1]).max()) == 0.0


def test_small_logits_are_not_tiled_and_large_ones_are():
    """Tiling recomputes each chunk's projection; below the size limit the plain path runs
    (no scan in the program), above it the chunked one, for the same chunk setting."""
    def program(t, vocab, **kw):
        hidden = jax.ShapeDtypeStruct((B, t, D), jnp.float32)
        w = jax.ShapeDtypeStruct((D, vocab), jnp.float32)
        tokens = jax.ShapeDtypeStruct((B, t), jnp.int32)
        f = lambda h, w, tok: tiled_lm_loss(lambda x: x @ w, h, tok, 4, **kw)  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(lambda *a: sum(f(*a)), (0, 1)))(hidden, w, tokens))

    assert "scan" not in program(T, V)  # 2 x 13 x 32 float32 logits
    assert "scan" in program(T, V, untiled_max_bytes=B * T * V * 4 - 1)
    assert "scan" in program(4096, 100352)  # 3.3 GB of logits: above the default limit


def test_lm_loss_equals_torch_cross_entropy_and_z_loss_with_gradients():
    """The plain loss against an independent reference: torch's cross_entropy over the
    B * (T - 1) next-token targets (masked ones dropped) and the mean logsumexp^2."""
    import torch

    logits = np.asarray(jax.random.normal(jax.random.key(1), (B, T, V)) * 3.0)
    tokens = np.asarray(_inputs()[2])
    mask = (np.arange(T)[None] % 3 != 0).astype(np.float32).repeat(B, 0)
    for m in (None, mask):
        ce, z = lm_loss(jnp.asarray(logits), jnp.asarray(tokens), None if m is None else jnp.asarray(m))
        g = jax.grad(lambda x: sum(lm_loss(x, jnp.asarray(tokens), None if m is None else jnp.asarray(m))))(
            jnp.asarray(logits))
        tl = torch.tensor(logits[:, :-1], requires_grad=True)
        keep = torch.ones(B, T - 1, dtype=torch.bool) if m is None else torch.tensor(m[:, 1:] > 0)
        picked = tl[keep]
        ref_ce = torch.nn.functional.cross_entropy(picked, torch.tensor(tokens[:, 1:]).long()[keep])
        ref_z = (torch.logsumexp(picked, -1) ** 2).mean()
        (ref_ce + ref_z).backward()
        np.testing.assert_allclose(float(ce), ref_ce.item(), rtol=1e-6)
        np.testing.assert_allclose(float(z), ref_z.item(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(g)[:, :-1], tl.grad.numpy(), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(g)[:, -1], 0.0)  # the last position has no target
