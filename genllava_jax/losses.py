"""Cross-entropy over the vocabulary without the (B, T, V) logits: a scan over vocabulary tiles with an online
logsumexp, and a custom VJP that recomputes each tile's logits in the backward pass (one more head matmul, no
(B, T, V) array in either pass; the residuals are the inputs and the (B, T) logsumexp).

The tile's logits are computed as the plain path computes them (a matmul in the model's dtype, then float32), so
loss and gradients equal the plain `optax.softmax_cross_entropy_with_integer_labels` up to summation order. The
last tile overlaps the one before it when the tile does not divide V (a clamped slice; its repeated columns are
masked), so the weights are never padded or copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from genllava_jax.errors import BadValue


def _tile(w, i, tile: int, vocab_axis: int):
    """(the i-th tile of w, its columns' vocabulary ids, which of them are new) for a clamped slice."""
    V = w.shape[vocab_axis]
    start = jnp.minimum(i * tile, V - tile)
    cols = start + jnp.arange(tile)
    return jax.lax.dynamic_slice_in_dim(w, start, tile, axis=vocab_axis), start, cols, cols >= i * tile


def _logits(h_BTD, w_tile, vocab_axis: int):
    eq = "btd,vd->btv" if vocab_axis == 0 else "btd,dv->btv"
    return jnp.einsum(eq, h_BTD, w_tile).astype(jnp.float32)


def _forward(h_BTD, w, labels_BT, tile: int, vocab_axis: int):
    n = -(-w.shape[vocab_axis] // tile)
    B, T, _ = h_BTD.shape

    def body(carry, i):
        m, s, label_logit, best, arg = carry
        w_tile, start, cols, new = _tile(w, i, tile, vocab_axis)
        logits = jnp.where(new, _logits(h_BTD, w_tile, vocab_axis), -jnp.inf)
        tile_max = logits.max(-1)
        m_new = jnp.maximum(m, tile_max)
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        label_logit += jnp.where(new & (cols == labels_BT[..., None]), logits, 0.0).sum(-1)
        better = tile_max > best  # strict: the first maximum wins, as argmax over the whole row
        arg = jnp.where(better, start + jnp.argmax(logits, -1).astype(jnp.int32), arg)
        return (m_new, s, label_logit, jnp.maximum(best, tile_max), arg), None

    f32 = lambda v: jnp.full((B, T), v, jnp.float32)
    init = (f32(-jnp.inf), f32(0.0), f32(0.0), f32(-jnp.inf), jnp.zeros((B, T), jnp.int32))
    (m, s, label_logit, _, arg), _ = jax.lax.scan(body, init, jnp.arange(n))
    lse = m + jnp.log(s)
    return lse - label_logit, arg, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled(h_BTD, w, labels_BT, tile, vocab_axis):
    ce, arg, _ = _forward(h_BTD, w, labels_BT, tile, vocab_axis)
    return ce, arg


def _tiled_fwd(h_BTD, w, labels_BT, tile, vocab_axis):
    ce, arg, lse = _forward(h_BTD, w, labels_BT, tile, vocab_axis)
    return (ce, arg), (h_BTD, w, labels_BT, lse)


def _tiled_bwd(tile, vocab_axis, res, cotangents):
    h_BTD, w, labels_BT, lse_BT = res
    g_BT = cotangents[0]
    n = -(-w.shape[vocab_axis] // tile)

    def body(carry, i):
        dh, dw = carry
        w_tile, start, cols, new = _tile(w, i, tile, vocab_axis)
        probs = jnp.exp(_logits(h_BTD, w_tile, vocab_axis) - lse_BT[..., None])
        d_logits = jnp.where(new, (probs - (cols == labels_BT[..., None])) * g_BT[..., None], 0.0)
        d_logits = d_logits.astype(h_BTD.dtype)  # as the plain path's matmul transposes run in the model dtype
        if vocab_axis == 0:
            dh += jnp.einsum("btv,vd->btd", d_logits, w_tile, preferred_element_type=jnp.float32)
            dw_tile = jnp.einsum("btv,btd->vd", d_logits, h_BTD, preferred_element_type=jnp.float32)
        else:
            dh += jnp.einsum("btv,dv->btd", d_logits, w_tile, preferred_element_type=jnp.float32)
            dw_tile = jnp.einsum("btv,btd->dv", d_logits, h_BTD, preferred_element_type=jnp.float32)
        # add, not set: the last tile overlaps the one before (its repeated columns have zero gradient here)
        dw = jax.lax.dynamic_update_slice_in_dim(
            dw, jax.lax.dynamic_slice_in_dim(dw, start, tile, axis=vocab_axis) + dw_tile, start, axis=vocab_axis)
        return (dh, dw), None

    init = (jnp.zeros(h_BTD.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(n))
    return dh.astype(h_BTD.dtype), dw.astype(w.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_cross_entropy(h_BTD: jax.Array, w: jax.Array, labels_BT: jax.Array, *, tile: int,
                        vocab_axis: int = 1) -> tuple[jax.Array, jax.Array]:
    """(per-token cross-entropy (B, T) in float32, argmax of the logits (B, T)) for logits = h @ w (w (D, V),
    `vocab_axis` 1) or h @ wᵀ (w (V, D), a tied embedding, `vocab_axis` 0), `tile` vocabulary columns at a time.
    Labels must be valid ids (mask ignored positions after, as with the plain loss)."""
    V = w.shape[vocab_axis]
    if not 0 < tile <= V:
        raise BadValue(f"tiled_cross_entropy: tile={tile} must be in 1..V={V}")
    return _tiled(h_BTD, w, labels_BT.astype(jnp.int32), tile, vocab_axis)
