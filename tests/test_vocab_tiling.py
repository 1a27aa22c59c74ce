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
                 else tiled_lm_loss(project, hidden, tokens, chunk))
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
