"""One attention function for every tower; its backend is chosen per tower by config (`model.<part>.attention`).

    attention(q_BTNH, k_BSKH, v_BSKH, Mask(causal=True, q_valid_BT=m, kv_valid_BS=m), backend="auto")

Backends (N query heads, K key/value heads, N a multiple of K):
- "xla": dense softmax(q·kᵀ)·v with (B, K, N/K, T, S) float32 logits. The only one taking an explicit
  `Mask.explicit_B1TS`, which the KV-cache prefill and decode need (their query and key positions index a cache,
  not one sequence): an explicit mask always runs dense, whatever the backend.
- "splash": TPU Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): causal, sliding
  window or full masks, T != S, GQA natively, padding through segment ids.
- "flash": TPU Pallas flash attention (jax.experimental.pallas.ops.tpu.flash_attention): causal or full, padding
  through segment ids, no sliding window; GQA by repeating the KV heads (the non-causal towers have none).
- "cudnn": GPU cuDNN fused attention, `jax.nn.dot_product_attention(implementation="cudnn")`.
- "auto": by the platform compiled for (the current mesh's devices, else the default backend): splash (causal) or
  flash (full) on TPU, so a TPU program compiled ahead of time on a CPU host gets the kernels; cudnn on GPU where
  cuDNN takes the shapes (half precision, head_dim a multiple of 8 up to 128); xla otherwise, CPU included.
  (Not `lax.platform_dependent`: differentiating it keeps the residuals of every branch, zeros included.)

The kernels see the sequences padded to a multiple of 128 (padding keys masked out) and run per shard: under a
mesh, shard_map over the batch and head axes the logical rules give the activations. Their outputs at padding
queries are unspecified (dense gives the mean over all keys there); no caller reads them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from genllava_jax import errors, sharding as shd

BACKENDS = ("auto", "xla", "splash", "flash", "cudnn")
_LANES = 128  # the kernels' sequence tiles are multiples of this
_interpret = [False]


class Mask(NamedTuple):
    """Which keys a query sees: valid keys (`kv_valid_BS`; all when None), not later ones (`causal`, by index) and
    within `sliding_window` of it. `q_valid_BT` marks the padding queries for the kernels (self-attention passes
    the same array twice). `explicit_B1TS` replaces all of it (dense path only)."""

    causal: bool = False
    sliding_window: int | None = None
    q_valid_BT: jax.Array | None = None
    kv_valid_BS: jax.Array | None = None
    explicit_B1TS: jax.Array | None = None


@contextlib.contextmanager
def pallas_interpret():
    """Splash attention in Pallas interpret mode (CPU tests). Flash takes `pltpu.force_tpu_interpret_mode()`
    instead; that mode cannot run the batch-vmapped splash kernel (jax 0.10.2)."""
    _interpret.append(True)
    try:
        yield
    finally:
        _interpret.pop()


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: Mask = Mask(), *,
              backend: str = "xla", scale: float | None = None) -> jax.Array:
    """Softmax attention (B, T, N, H); the output is tagged `attn_out` for the remat policies."""
    if backend not in BACKENDS:
        raise errors.BadValue(f"attention backend {backend!r}: choose one of {BACKENDS}")
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise errors.BadValue(f"attention: {q_BTNH.shape[2]} query heads are not a multiple of {k_BSKH.shape[2]} "
                              f"KV heads")
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    if mask.explicit_B1TS is not None:
        backend = "xla"
    elif backend == "auto":
        backend = auto_backend(q_BTNH, mask.causal)
    if backend == "flash" and mask.sliding_window is not None:
        raise errors.BadValue("attention backend 'flash' has no sliding window: use 'splash' or 'xla'")
    if backend in ("splash", "flash"):
        out = _kernel(backend, q_BTNH, k_BSKH, v_BSKH, mask, scale)
    elif backend == "cudnn":
        out = cudnn(q_BTNH, k_BSKH, v_BSKH, mask, scale)
    else:
        out = dense(q_BTNH, k_BSKH, v_BSKH, mask, scale)
    return checkpoint_name(out, "attn_out")


def target_platform() -> str:
    """The platform being compiled for: the current mesh's devices (a TPU slice compiled ahead of time on a CPU
    host is "tpu"), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = jax.default_backend() if device is None else device.platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def auto_backend(q_BTNH, causal: bool) -> str:
    """splash (causal) or flash on TPU; cudnn on GPU where cuDNN takes the shapes; xla elsewhere."""
    platform = target_platform()
    if platform == "tpu":
        return "splash" if causal else "flash"
    H = q_BTNH.shape[-1]
    if platform == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and H % 8 == 0 and H <= 128:
        return "cudnn"
    return "xla"


# ---------------------------------------------------------------------------------------------------------------
# Dense (XLA)


def index_mask(mask: Mask, T: int, S: int) -> jax.Array | None:
    """The (B or 1, 1, T, S) boolean mask `mask` describes, by sequence index; None when every key is seen."""
    if mask.explicit_B1TS is not None:
        return mask.explicit_B1TS
    m = None
    if mask.causal or mask.sliding_window is not None:
        diff = jnp.arange(T)[:, None] - jnp.arange(S)[None, :]
        m = diff >= 0 if mask.causal else jnp.ones((T, S), bool)
        if mask.sliding_window is not None:
            m &= diff < mask.sliding_window
        m = m[None, None]
    if mask.kv_valid_BS is not None:
        kv = mask.kv_valid_BS.astype(bool)[:, None, None, :]
        m = kv if m is None else m & kv
    return m


def dense(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float) -> jax.Array:
    """Grouped-query softmax attention, logits and softmax in float32; fully masked rows give a uniform mean."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKH, preferred_element_type=jnp.float32) * scale
    m = index_mask(mask, T, S)
    if m is not None:
        logits = jnp.where(m[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH).reshape(B, T, N, H)


# ---------------------------------------------------------------------------------------------------------------
# cuDNN (GPU)


def cudnn(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float, implementation: str = "cudnn") -> jax.Array:
    """jax.nn.dot_product_attention, which takes our (B, T, N, H) layout and GQA as they are; `implementation`
    is "cudnn" but for tests of this plumbing on a machine without a GPU."""
    valid = None if mask.kv_valid_BS is None else mask.kv_valid_BS.astype(bool)[:, None, None, :]
    window = None if mask.sliding_window is None else (mask.sliding_window - 1, 0)  # keys t-W+1 .. t
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=valid, scale=scale, is_causal=mask.causal,
                                        local_window_size=window, implementation=implementation)


# ---------------------------------------------------------------------------------------------------------------
# TPU Pallas kernels


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int) -> int:
    """The largest of 512, 256, 128 that divides n (a multiple of 128)."""
    return next(b for b in (512, 256, _LANES) if n % b == 0)


def _kernel(name: str, q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float) -> jax.Array:
    B, T, N, _ = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    if mask.causal and T != S:
        raise errors.BadValue(f"attention: causal kernels need T == S, got T={T}, S={S}")
    # segment ids: 1 valid, 0 padding (ours and the kernels' tile padding); a padding query then sees padding keys
    # only, and in causal self-attention at least itself
    q_seg = jnp.ones((B, T), jnp.int32) if mask.q_valid_BT is None else mask.q_valid_BT.astype(jnp.int32)
    kv_seg = jnp.ones((B, S), jnp.int32) if mask.kv_valid_BS is None else mask.kv_valid_BS.astype(jnp.int32)
    Tp, Sp = _round_up(T, _LANES), _round_up(S, _LANES)
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    q, k, v, q_seg, kv_seg = pad(q_BTNH, Tp), pad(k_BSKH, Sp), pad(v_BSKH, Sp), pad(q_seg, Tp), pad(kv_seg, Sp)
    local = functools.partial(_splash if name == "splash" else _flash, causal=mask.causal,
                              window=mask.sliding_window, scale=scale, interpret=_interpret[-1])
    return _per_shard(local, q, k, v, q_seg, kv_seg)[:, :T]


def _per_shard(fn, q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS):
    """fn on each device's rows and heads (shard_map over the mesh's batch and head axes), or whole off a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS)
    B, _, N, _ = q_BTNH.shape
    K = k_BSKH.shape[2]
    b = shd.logical_to_spec(("batch",), (B,), mesh)[0]
    h = shd.logical_to_spec(("act_heads",), (N,), mesh)[0]
    if h is not None and K % math.prod(mesh.shape[a] for a in ((h,) if isinstance(h, str) else h)):
        # the KV heads do not split like the query heads: give every query head its own copy
        k_BSKH, v_BSKH = (jnp.repeat(x, N // K, axis=2) for x in (k_BSKH, v_BSKH))
    heads, rows = P(b, None, h, None), P(b, None)
    return jax.shard_map(fn, in_specs=(heads, heads, heads, rows, rows), out_specs=heads,
                         check_vma=False)(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS)


SKIP_SCOPE = "splash_blocks_"  # + "{run}_of_{all}": the named scope of a splash call (see _splash)


def splash_blocks(T: int, S: int, causal: bool, window: int | None) -> tuple[int, int]:
    """(blocks the splash kernel runs, blocks of its grid) per head: a (query, key) block runs when the mask
    keeps any of its pairs (key <= query under causal; query - key < window under a window); the grid has a row of
    query blocks by as many key blocks as the fullest row runs (splash drops the columns no row needs)."""
    bq, bk = _block(T), _block(S)
    q, k = np.arange(T // bq)[:, None] * bq, np.arange(S // bk)[None, :] * bk
    q_hi, k_hi = q + bq - 1, k + bk - 1
    run = np.ones((q.size, k.size), bool)
    if causal or window is not None:
        run &= q_hi >= k
    if window is not None:
        run &= q - k_hi < window
    return int(run.sum()), q.size * int(run.sum(1).max())


def _splash_kernel(heads: int, T: int, S: int, causal: bool, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is not None:  # keys t-W+1 .. t (Mistral's window), causal included
        one = sa.LocalMask((T, S), window_size=(window - 1, 0), offset=0)
    else:
        one = sa.CausalMask((T, S)) if causal else sa.FullMask((T, S))
    bq, bkv = _block(T), _block(S)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # the kernel's own residuals (output, logsumexp) carry the name too: a policy saving `attn_out` then skips
    # the forward kernel in the backward pass. Built at each trace: its mask tables become the program's constants.
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name="attn_out", interpret=interpret)


def _splash(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, *, causal, window, scale, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    N, T, S = q_BTNH.shape[2], q_BTNH.shape[1], k_BSKH.shape[1]
    kernel = _splash_kernel(N, T, S, causal, window, interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    q = heads_first(q_BTNH * jnp.asarray(scale, q_BTNH.dtype))  # splash has no softmax scale of its own
    # the blocks its static mask leaves empty the kernel skips (no MXU work): the scope tells launch/simulate.py
    run, every = splash_blocks(T, S, causal, window)
    with jax.named_scope(f"{SKIP_SCOPE}{run}_of_{every}"):
        out = jax.vmap(kernel)(q, heads_first(k_BSKH), heads_first(v_BSKH),
                               segment_ids=SegmentIds(q_seg_BT, kv_seg_BS))
    return heads_first(out)


def _flash(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, *, causal, window, scale, interpret):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    del window, interpret  # no window (refused above); interpret: pltpu.force_tpu_interpret_mode()
    N, K = q_BTNH.shape[2], k_BSKH.shape[2]
    if K != N:
        k_BSKH, v_BSKH = (jnp.repeat(x, N // K, axis=2) for x in (k_BSKH, v_BSKH))
    bq, bk = _block(q_BTNH.shape[1]), _block(k_BSKH.shape[1])
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                           block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk,
                           block_q_dq=bq)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = fa.flash_attention(heads_first(q_BTNH), heads_first(k_BSKH), heads_first(v_BSKH),
                             segment_ids=fa.SegmentIds(q_seg_BT, kv_seg_BS), causal=causal, sm_scale=scale,
                             block_sizes=blocks)
    return heads_first(out)
