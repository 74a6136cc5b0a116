"""Remat policies by checkpoint name (layers.REMAT_POLICIES, "save:..." / "offload:..."): each gives the loss and
gradients of no remat, on the scanned Mistral, SigLIP and Q-former, host offload included (CPU has a pinned_host
memory too). The UNet is left out: its two compiles cost minutes (the suite's time is tight)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genllava_jax import layers
from genllava_jax.models.mistral import Mistral, MistralConfig
from genllava_jax.models.qformer import TINY_HEAD, QFormerHead
from genllava_jax.models.siglip import SiglipVision, SiglipVisionConfig

# one compile each (the suite's time is tight): on Mistral a named save, a named host offload and full remat with the
# layer input offloaded; on the other towers the policy that offloads every name they tag
MISTRAL = ["save_dots_except_mlp", "offload:q_proj,mlp_out", "offload_layer_input"]


def data(*shape, ints=None):
    x = np.random.default_rng(sum(shape)).normal(size=shape)
    return jnp.asarray(x, jnp.float32) if ints is None else jnp.asarray(np.abs(x * 100).astype(int) % ints)


def pad(B, L, valid):
    return jnp.asarray(np.arange(L)[None] < np.asarray(valid)[:, None])


TOWERS = {  # name: (build(remat policy), loss(model))
    "mistral": (lambda p: Mistral(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_layers=2,
                                                num_heads=4, num_kv_heads=2, head_dim=8, remat=p), rngs=nnx.Rngs(0)),
                lambda m: jnp.sum(m(data(2, 12, ints=64), attention_mask=pad(2, 12, [12, 9])).logits ** 2)),
    "siglip": (lambda p: SiglipVision(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                                         num_heads=4, image_size=16, patch_size=4, remat=p),
                                      rngs=nnx.Rngs(0)),
               lambda m: jnp.sum(m(data(2, 16, 16, 3)).features ** 2)),
    "qformer": (lambda p: QFormerHead(TINY_HEAD.replace(remat=p), rngs=nnx.Rngs(0)),
                lambda m: jnp.sum(m(data(2, 5, 64), data(2, 5, 65)[..., :64], pad(2, 5, [5, 3])) ** 2)),
}


def loss_and_grads(tower, policy):
    build, loss = TOWERS[tower]
    graphdef, state = nnx.split(build(policy))
    return jax.jit(jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s))))(state)


@pytest.mark.slow  # 37-73 s a tower on this shared machine (load ~10 on 2 cores)
@pytest.mark.parametrize("tower", TOWERS)
def test_named_policies_give_the_loss_and_gradients_of_none(tower):
    want = loss_and_grads(tower, "none")
    for policy in MISTRAL if tower == "mistral" else ["offload_all_names"]:
        (loss, grads) = loss_and_grads(tower, policy)
        np.testing.assert_allclose(loss, want[0], rtol=1e-6, err_msg=policy)
        scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want[1]))
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want[1])):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=policy)


def test_policies_keep_what_they_name_on_device_or_host():
    """The MLP's (layers, B, T, intermediate) activations: not kept by save_dots_except_mlp, kept on the device by
    save:mlp_in, on the host by offload_all_names."""
    build, loss = TOWERS["mistral"]

    def kept(policy):
        graphdef, state = nnx.split(build(policy))
        _, f_vjp = jax.vjp(lambda s: loss(nnx.merge(graphdef, s)), state)
        return [x.sharding.memory_kind for x in jax.tree.leaves(f_vjp) if getattr(x, "shape", None) == (2, 2, 12, 96)]

    assert kept("save_dots_except_mlp") == []
    assert kept("save:mlp_in") == ["device"] * 2  # gate and up
    assert kept("offload_all_names") == ["pinned_host"] * 2


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="unknown remat policy 'save:mlp_inn'.*unknown names \\['mlp_inn'\\]"):
        layers.remat_policy("save:mlp_inn")
    with pytest.raises(ValueError, match="unknown remat policy 'ful'.*full"):
        layers.remat(lambda x: x, "ful")
