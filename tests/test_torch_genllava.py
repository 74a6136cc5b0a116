"""The joint loss against the same model composed in torch from transformers/diffusers modules (our weights exported
by each part's converter): loss, its parts and the gradients of the trained parameters agree."""

import jax
import numpy as np
import pytest
from flax import nnx
from micro import fixed_batch

from convert.torch_genllava import TorchGenLLaVA, draws_of

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("variant", [dict(diffusion_rows=0, diffusion_repeats=2, snr_gamma=5.0),
                                     dict(diffusion_rows=3, diffusion_repeats=1, snr_gamma=None,
                                          sample_latents=True)])
def test_joint_loss_and_gradients_match_the_torch_composition(built, tmp_path, variant):
    c, cfg, tokenizer, fresh = built
    model = fresh()
    model.cfg = cfg.replace(cond_drop_prob=0.3, **variant)  # some rows take the null conditioning
    batch = {k: np.asarray(v) for k, v in fixed_batch(c, tokenizer).items() if not k.startswith("_")}
    assert batch["has_target"].any() and not batch["has_target"].all()
    rng = jax.random.key(3)
    draws = draws_of(model.cfg, rng, len(batch["input_ids"]))
    assert draws["drop"].any()

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    (loss, ours), grads = jax.jit(jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p, rest).loss(batch, rng), has_aux=True))(params)

    ref = TorchGenLLaVA.from_jax(model, tmp_path)
    theirs_loss, theirs = ref.loss(batch, draws)
    theirs_loss.backward()
    for k in ("ce", "mse", "token_accuracy"):
        np.testing.assert_allclose(float(ours[k]), theirs[k].item(), rtol=2e-5, err_msg=k)
    np.testing.assert_allclose(float(loss), theirs_loss.item(), rtol=2e-5)

    g = lambda *path: np.asarray(_at(grads, path).get_value())
    pairs = {  # our gradient, torch's (same layout for these)
        "null_cond": (g("null_cond"), ref.null_cond.grad),
        "head query tokens": (g("head", "query_tokens"), ref.head.query_tokens.grad),
        "LLM embeddings": (g("llm", "embed", "embedding"), ref.llm.get_input_embeddings().weight.grad),
        "vision patch bias": (g("vision", "patch_embed", "bias"),
                              ref.vision.embeddings.patch_embedding.bias.grad),
        "UNet conv_in bias": (g("unet", "conv_in", "bias"), ref.unet.conv_in.bias.grad),
    }
    for name, (a, b) in pairs.items():
        b = b.numpy()
        assert np.abs(b).max() > 0, name
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max(), err_msg=name)


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree
