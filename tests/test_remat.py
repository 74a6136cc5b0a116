"""Remat policies by checkpoint name (layers.REMAT_POLICIES, "save:..." / "offload:..."): each gives the loss and
gradients of no remat, on the scanned Mistral (every policy and a name list), the UNet (full remat and every policy by
name: it tags every name), SigLIP and the Q-former, host offload included (CPU has a pinned_host memory too).

Cheap by construction: one random state per tower (drawn with numpy, shared by its policies), the no-remat reference
computed once per tower, one compile per policy, and those compiles at XLA's lowest CPU optimisation level (compiling
is the whole cost at these shapes; the numbers are compared against a reference compiled the same way)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genllava_jax import layers
from genllava_jax.models.mistral import Mistral, MistralConfig
from genllava_jax.models.qformer import TINY_HEAD, QFormerHead
from genllava_jax.models.siglip import SiglipVision, SiglipVisionConfig
from genllava_jax.models.unet import UNet, UNetConfig

POLICIES = [p for p in layers.REMAT_POLICIES if p != "none"]
BY_NAME = [p for p in POLICIES if p.startswith(("save_", "offload_"))]  # the policies the checkpoint_name tags drive
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def data(*shape, ints=None):
    x = np.random.default_rng(sum(shape)).normal(size=shape)
    return jnp.asarray(x, jnp.float32) if ints is None else jnp.asarray(np.abs(x * 100).astype(int) % ints)


def pad(B, L, valid):
    return jnp.asarray(np.arange(L)[None] < np.asarray(valid)[:, None])


# one cross-attention down block, the mid block and one up block: every kind of block the UNet remats
UNET = UNetConfig(sample_size=4, block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), heads=(2,), layers_per_block=1, norm_num_groups=4,
                  cross_attention_dim=8)

TOWERS = {  # name: (build(remat policy), loss(model), the policies checked)
    "mistral": (lambda p: Mistral(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_layers=2,
                                                num_heads=4, num_kv_heads=2, head_dim=8, remat=p), rngs=nnx.Rngs(0)),
                lambda m: jnp.sum(m(data(2, 12, ints=64), attention_mask=pad(2, 12, [12, 9])).logits ** 2),
                POLICIES + ["offload:q_proj,mlp_out"]),
    "unet": (lambda p: UNet(UNET.replace(remat=p), rngs=nnx.Rngs(0)),
             lambda m: jnp.sum(m(data(2, 4, 4, 4), jnp.array([999, 17]), data(2, 3, 8)) ** 2),
             ["full"] + BY_NAME),
    "siglip": (lambda p: SiglipVision(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                                         num_heads=4, image_size=16, patch_size=4, remat=p),
                                      rngs=nnx.Rngs(0)),
               lambda m: jnp.sum(m(data(2, 16, 16, 3)).features ** 2),
               ["offload_all_names"]),
    "qformer": (lambda p: QFormerHead(TINY_HEAD.replace(remat=p), rngs=nnx.Rngs(0)),
                lambda m: jnp.sum(m(data(2, 5, 64), data(2, 5, 65)[..., :64], pad(2, 5, [5, 3])) ** 2),
                ["offload_all_names"]),
}
CASES = [(tower, policy) for tower, (_, _, policies) in TOWERS.items() for policy in policies]


def graphdef(tower, policy):
    return nnx.graphdef(nnx.eval_shape(lambda: TOWERS[tower][0](policy)))


@functools.cache
def params(tower):
    """The tower's state, every float random (without compiling an initialiser), shared by all its policies."""
    rng = np.random.RandomState(0)
    state = nnx.state(nnx.eval_shape(lambda: TOWERS[tower][0]("none")))
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.randn(*a.shape), a.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype), state)


def loss_and_grads(tower, policy):
    g, loss = graphdef(tower, policy), TOWERS[tower][1]
    fn = jax.jit(jax.value_and_grad(lambda s: loss(nnx.merge(g, s))))
    return fn.lower(params(tower)).compile(FAST_COMPILE)(params(tower))


reference = functools.cache(lambda tower: loss_and_grads(tower, "none"))


@pytest.mark.parametrize("tower,policy", CASES)
def test_policy_gives_the_loss_and_gradients_of_none(tower, policy):
    want_loss, want = reference(tower)
    loss, grads = loss_and_grads(tower, policy)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want))
    assert scale > 0
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("tower", ["mistral", "unet"])
def test_the_towers_tag_every_checkpoint_name(tower):
    """So every policy by name acts on them (traced only, nothing compiled)."""
    g, loss = graphdef(tower, "full"), TOWERS[tower][1]
    jaxpr = str(jax.make_jaxpr(lambda s: loss(nnx.merge(g, s)))(params(tower)))
    assert set(re.findall(r"name\[name=(\w+)", jaxpr)) == set(layers.CHECKPOINT_NAMES)


def test_policies_keep_what_they_name_on_device_or_host():
    """The MLP's (layers, B, T, intermediate) activations: not kept by save_dots_except_mlp, kept on the device by
    save:mlp_in, on the host by offload_all_names."""
    loss = TOWERS["mistral"][1]

    def kept(policy):
        g = graphdef("mistral", policy)
        _, f_vjp = jax.vjp(lambda s: loss(nnx.merge(g, s)), params("mistral"))
        return [x.sharding.memory_kind for x in jax.tree.leaves(f_vjp) if getattr(x, "shape", None) == (2, 2, 12, 96)]

    assert kept("save_dots_except_mlp") == []
    assert kept("save:mlp_in") == ["device"] * 2  # gate and up
    assert kept("offload_all_names") == ["pinned_host"] * 2


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="unknown remat policy 'save:mlp_inn'.*unknown names \\['mlp_inn'\\]"):
        layers.remat_policy("save:mlp_inn")
    with pytest.raises(ValueError, match="unknown remat policy 'ful'.*full"):
        layers.remat(lambda x: x, "ful")
