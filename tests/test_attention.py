"""The attention entry point: every backend's forward and gradients equal the dense XLA attention's (causal, sliding
window, left/right padding, GQA, cross-attention with T != S), the Pallas kernels in interpret mode on CPU; the
kernels per shard under a mesh; `auto` dense on CPU and the kernels when compiled for TPU. cuDNN itself cannot run
here: its plumbing runs through jax.nn.dot_product_attention's XLA implementation and what it passes is checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from genllava_jax import attention as att
from genllava_jax import sharding as shd

B, N, K, H = 2, 4, 2, 16


def qkv(T, S, n=N, k=K, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, T, n, H), (B, S, k, H), (B, S, k, H)))


def padding(L, left=5, right=7):
    """Row 0 left-padded by `left`, row 1 right-padded by `right`."""
    m = np.ones((B, L), bool)
    m[0, :left] = False
    m[1, L - right:] = False
    return jnp.asarray(m)


T = 40
CASES = {  # name: (T, S, heads (N, K), mask); T and S not multiples of the kernels' 128-tiles
    "causal_gqa": (T, T, (N, K), att.Mask(causal=True)),
    "causal_window_padded": (T, T, (N, K), att.Mask(causal=True, sliding_window=8, q_valid_BT=padding(T),
                                                    kv_valid_BS=padding(T))),
    "full_padded": (T, T, (N, N), att.Mask(q_valid_BT=padding(T), kv_valid_BS=padding(T))),
    "cross_T_ne_S_padded_gqa": (24, T, (N, K), att.Mask(kv_valid_BS=padding(T, left=0))),
}


def out_and_grads(fn, q, k, v, mask):
    """(output, d/d(q, k, v) of a random projection of the output at the valid queries)."""
    valid = jnp.ones(q.shape[:2], bool) if mask.q_valid_BT is None else mask.q_valid_BT
    cot = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32) * valid[..., None, None]

    def f(q, k, v):
        out = fn(q, k, v, mask)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out * valid[..., None, None], grads


def assert_close(got, want, tol=1e-4):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.abs(w).max())
        assert float(jnp.abs(g - w).max()) <= tol * scale, (float(jnp.abs(g - w).max()), scale)


def backend(name):
    return lambda q, k, v, mask: att.attention(q, k, v, mask, backend=name)


@pytest.fixture(scope="module")
def reference():
    return {name: out_and_grads(backend("xla"), *qkv(t, s, *heads), mask)
            for name, (t, s, heads, mask) in CASES.items()}


@pytest.mark.parametrize("case", CASES)
def test_splash_equals_dense(case, reference):
    t, s, heads, mask = CASES[case]
    with att.pallas_interpret():
        got = out_and_grads(backend("splash"), *qkv(t, s, *heads), mask)
    assert_close(got, reference[case])


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3].sliding_window is None])
def test_flash_equals_dense(case, reference):
    t, s, heads, mask = CASES[case]
    with pltpu.force_tpu_interpret_mode():
        got = out_and_grads(backend("flash"), *qkv(t, s, *heads), mask)
    assert_close(got, reference[case])


def test_flash_refuses_a_sliding_window():
    with pytest.raises(ValueError, match="no sliding window"):
        att.attention(*qkv(8, 8), att.Mask(causal=True, sliding_window=4), backend="flash")


@pytest.mark.parametrize("case", CASES)
def test_cudnn_plumbing_equals_dense_through_xla(case, reference):
    """Our arguments to jax.nn.dot_product_attention (layout, GQA, mask, window) with its XLA implementation:
    cuDNN itself was not run (no GPU here)."""
    t, s, heads, mask = CASES[case]
    got = out_and_grads(lambda q, k, v, m: att.cudnn(q, k, v, m, H ** -0.5, implementation="xla"),
                        *qkv(t, s, *heads), mask)
    assert_close(got, reference[case])


def test_cudnn_backend_passes_cudnn_our_layout_and_mask(monkeypatch):
    seen = {}

    def spy(q, k, v, **kw):
        seen.update(shapes=(q.shape, k.shape, v.shape), **kw)
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = qkv(T, T)
    valid = padding(T)
    att.attention(q, k, v, att.Mask(causal=True, sliding_window=8, q_valid_BT=valid, kv_valid_BS=valid),
                  backend="cudnn")
    assert seen["implementation"] == "cudnn" and seen["is_causal"] and seen["local_window_size"] == (7, 0)
    assert seen["shapes"] == ((B, T, N, H), (B, T, K, H), (B, T, K, H))  # BTNH, GQA heads not repeated
    assert seen["mask"].shape == (B, 1, 1, T) and bool((seen["mask"][:, 0, 0] == valid).all())
    assert seen["scale"] == pytest.approx(H ** -0.5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="'splsh'.*choose one of"):
        att.attention(*qkv(8, 8), backend="splsh")


def test_auto_is_dense_on_cpu_and_an_explicit_mask_always_dense():
    q, k, v = qkv(T, T)
    mask = att.Mask(causal=True, q_valid_BT=padding(T), kv_valid_BS=padding(T))
    run = lambda m, name: jax.jit(lambda *a: att.attention(*a, m, backend=name))(q, k, v)
    dense = run(mask, "xla")
    np.testing.assert_array_equal(run(mask, "auto"), dense)
    np.testing.assert_array_equal(run(att.Mask(explicit_B1TS=att.index_mask(mask, T, T)), "splash"), dense)


def test_kernels_run_per_shard_under_a_mesh(reference):
    """shard_map over (data, fsdp) rows and tensor heads on 8 devices; 2 KV heads on tensor=2 split with them."""
    mesh = shd.make_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    t, s, heads, mask = CASES["causal_window_padded"]
    with att.pallas_interpret(), jax.set_mesh(mesh):
        got = out_and_grads(backend("splash"), *qkv(t, s, *heads), mask)
    assert_close(got, reference["causal_window_padded"])


@pytest.mark.slow
def test_towers_compile_with_the_tpu_kernels_for_a_v5e_slice():
    """Through libtpu on this CPU: a tiny Mistral (causal, sliding window, padding, GQA) and SigLIP, bfloat16, their
    gradients under `auto` on a 2x2 v5e mesh (data=2, tensor=2): splash and flash lower as Mosaic kernels per shard."""
    from flax import nnx

    from genllava_jax.models.mistral import Mistral, MistralConfig
    from genllava_jax.models.siglip import SiglipVision, SiglipVisionConfig
    from launch import aot

    bf16 = dict(dtype="bfloat16", param_dtype="float32")
    llm = Mistral(MistralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=64, sliding_window=96, remat="full", **bf16),
                  rngs=nnx.Rngs(0))
    vit = SiglipVision(SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                                          image_size=56, patch_size=14, **bf16), rngs=nnx.Rngs(0))
    mesh = aot.build_mesh(dict(data=2, tensor=2), aot.target_devices("v5e:2x2"))
    (g_llm, s_llm), (g_vit, s_vit) = nnx.split(llm), nnx.split(vit)

    def loss(s_llm, s_vit, ids, valid, images):
        logits = nnx.merge(g_llm, s_llm)(ids, attention_mask=valid).logits
        feats = nnx.merge(g_vit, s_vit)(images).features
        return jnp.mean(logits.astype(jnp.float32) ** 2) + jnp.mean(feats.astype(jnp.float32) ** 2)

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec())), tree)

    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    args = (abstract(s_llm), abstract(s_vit), jax.ShapeDtypeStruct((4, 200), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((4, 200), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((4, 56, 56, 3), jnp.float32, sharding=rows))
    # the tests' "highest" matmul precision would ask Mosaic for float32 passes on bfloat16 operands
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    kernels = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    names = " ".join(kernels)
    assert "splash" in names and "flash" in names, names[:2000]
