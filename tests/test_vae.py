"""VAE against diffusers.AutoencoderKL on small random configs (float32)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as HFVAE
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from convert import vae as conv
from convert.common import ConversionError
from oracle import assert_close

CONFIGS = {
    # SD's layout: attention in the mid block, quant convs
    "sd": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    # three levels, two layers a block, no mid attention, no quant convs, another latent width and scale
    "variant": dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=3,
                    mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                    scaling_factor=0.13025),
}


def hf_vae(tmp_path, name):
    n = len(CONFIGS[name]["block_out_channels"])
    torch.manual_seed(0)
    model = HFVAE(sample_size=16, down_block_types=("DownEncoderBlock2D",) * n,
                  up_block_types=("UpDecoderBlock2D",) * n, **CONFIGS[name]).eval()
    model.save_pretrained(str(tmp_path / name))
    return model, tmp_path / name


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(method, graphdef, state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args)


def call(model, method, *args):
    args = [jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    return jax.tree.map(np.asarray, _call(method, *nnx.split(model), *args))


def nhwc(a):
    return a.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encoder_and_decoder_match_diffusers(tmp_path, name):
    model, path = hf_vae(tmp_path, name)
    ours = conv.from_hf(path)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    f = 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
    z = rng.randn(2, model.config.latent_channels, 16 // f, 16 // f).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.tensor(x)).latent_dist
        decoded = model.decode(torch.tensor(z)).sample.numpy()
    mean, logvar = call(ours, "encode", nhwc(x))
    assert_close(mean, nhwc(dist.mean.numpy()), what="mean")
    assert_close(logvar, nhwc(dist.logvar.numpy()), what="logvar")
    assert_close(call(ours, "decode", nhwc(z)), nhwc(decoded), what="decoded")
    # diffusion latents and back: scaled posterior mean, and the pipelines' decode(latents / scaling_factor)
    s = model.config.scaling_factor
    assert_close(call(ours, "latents", nhwc(x)), nhwc(dist.mean.numpy()) * s, what="latents")
    assert_close(call(ours, "decode_latents", nhwc(z) * s), nhwc(decoded), what="decode_latents")


def test_posterior_sample_and_reconstruction(tmp_path):
    model, path = hf_vae(tmp_path, "sd")
    ours = conv.from_hf(path)
    x = np.random.RandomState(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    rng = jax.random.key(3)
    mean, logvar = call(ours, "encode", nhwc(x))
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    with torch.no_grad():
        dist = model.encode(torch.tensor(x)).latent_dist
        ref = dist.mean + dist.std * torch.tensor(eps.transpose(0, 3, 1, 2))  # DiagonalGaussian.sample's formula
        recon = model(torch.tensor(x)).sample.numpy()  # AutoencoderKL.forward decodes the mean
    assert_close(call(ours, "sample", mean, logvar, rng), nhwc(ref.numpy()), what="posterior sample")
    assert_close(call(ours, "__call__", nhwc(x)), nhwc(recon), what="reconstruction")


def test_round_trip_reloads_strictly_and_legacy_attention_names_load(tmp_path):
    model, path = hf_vae(tmp_path, "sd")
    ours = conv.from_hf(path)
    conv.to_hf(ours, tmp_path / "back")
    back, info = HFVAE.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    z = torch.tensor(np.random.RandomState(2).randn(1, 4, 8, 8).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_array_equal(back.eval().decode(z).sample.numpy(), model.decode(z).sample.numpy())
    # old checkpoints name the mid-block attention query/key/value/proj_attn
    tensors = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
              .replace("to_out.0", "proj_attn"): v for k, v in tensors.items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    save_file(legacy, str(path / "diffusion_pytorch_model.safetensors"))
    old = conv.from_hf(path)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(old)), nnx.to_flat_state(nnx.state(ours))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))


def test_unsupported_config_and_bad_checkpoint_are_refused(tmp_path):
    _, path = hf_vae(tmp_path, "sd")
    cfg = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="latents_mean"):
        conv.VAEConfig.from_hf({**cfg, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        conv.VAEConfig.from_hf({**cfg, "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]})
    tensors = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    tensors["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=r"encoder\.conv_in\.weight.*\(16, 3, 5, 5\)"):
        conv.from_hf(path)


def test_fit_vae_learns_and_scales_latents_to_unit_std(tmp_path):
    """The demo's VAE fit: reconstructions improve, and `scaling_factor` makes the latent means' std 1 (SD's
    convention), computed over every image (70: more than one chunk, the last one padded)."""
    from genllava_jax.data import synthetic
    from genllava_jax.data.synthetic import ALL_SCENES
    from genllava_jax.vae_fit import fit_vae, load_images

    for i, scene in enumerate(ALL_SCENES[:70]):
        Image.fromarray(synthetic.render(scene, 16, i % 3)).save(tmp_path / f"{i:03d}.png")
    images = load_images(tmp_path, 16)
    cfg = conv.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)
    mse = lambda vae: float(np.mean((np.asarray(jax.jit(lambda x: vae.decode(vae.encode(x)[0]))(images)) - images)
                                    ** 2))
    before = mse(fit_vae(cfg, images, steps=1, lr=1e-9, batch_size=8)[0])
    vae, metrics = fit_vae(cfg, images, steps=60, lr=5e-3, batch_size=8)
    assert mse(vae) < 0.5 * before
    means = np.asarray(vae.encode(images)[0])
    assert abs(metrics["scaling_factor"] * means.std() - 1) < 1e-4
    assert vae.cfg.scaling_factor == metrics["scaling_factor"]
