"""Vocabulary-tiled cross-entropy equals the plain one (optax on the whole logits): loss, argmax and gradients, for
an untied head (D, V) and a tied embedding (V, D), a tile that divides V and one that does not."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genllava_jax.losses import tiled_cross_entropy

B, T, D, V = 2, 6, 16, 37


def plain(h, w, labels, vocab_axis):
    logits = (h @ w if vocab_axis == 1 else h @ w.T).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits.argmax(-1)


@pytest.mark.parametrize("vocab_axis", [1, 0])
@pytest.mark.parametrize("tile", [8, 37, 1])
def test_tiled_equals_plain_loss_argmax_and_gradients(tile, vocab_axis):
    r = np.random.default_rng(tile + vocab_axis)
    h = jnp.asarray(r.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(r.normal(size=(D, V) if vocab_axis == 1 else (V, D)), jnp.float32)
    labels = jnp.asarray(r.integers(0, V, (B, T)))
    weight = jnp.asarray(r.random((B, T)) > 0.3, jnp.float32)  # masked positions, as the joint loss has

    def loss(fn):
        def f(h, w):
            ce, arg = fn(h, w)
            return (ce * weight).sum(), (ce, arg)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)

    (want_l, (want_ce, want_arg)), want_g = loss(lambda h, w: plain(h, w, labels, vocab_axis))
    (got_l, (got_ce, got_arg)), got_g = loss(lambda h, w: tiled_cross_entropy(h, w, labels, tile=tile,
                                                                              vocab_axis=vocab_axis))
    np.testing.assert_allclose(got_ce, want_ce, rtol=1e-5)
    np.testing.assert_array_equal(got_arg, want_arg)
    for g, w_ in zip(got_g, want_g):
        np.testing.assert_allclose(g, w_, atol=1e-5 * float(jnp.abs(w_).max()))


def test_bad_tile_is_refused():
    with pytest.raises(ValueError, match="tile=40 must be in 1..V=37"):
        tiled_cross_entropy(jnp.zeros((1, 1, D)), jnp.zeros((D, V)), jnp.zeros((1, 1), int), tile=40)
