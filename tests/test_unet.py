"""UNet against diffusers.UNet2DConditionModel on small random configs, and guided sampling against the diffusers
pipelines (float32)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL as HFVAE, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
from flax import nnx
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from convert import stable_diffusion as sd_conv, unet as conv
from convert.common import ConversionError
from genllava_jax import checkpoint, diffusion as dif, sharding as shd
from genllava_jax.models.unet import widen_conv_in
from oracle import assert_close

BASE = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    # SD 1.x: conv proj_in/out, one head count for every block
    "sd1": dict(cross_attention_dim=24, attention_head_dim=4),
    # SD 2.x: linear proj_in/out, per-block head counts, another context width; plus two layers a block, the other
    # sinusoid layout and upcast_attention (a no-op in float32)
    "sd2": dict(cross_attention_dim=40, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=16,
                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2, flip_sin_to_cos=False, freq_shift=1,
                upcast_attention=True),
}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, ctx):
    return nnx.merge(graphdef, state)(x, t, ctx)


def forward(model, x_NHWC, t, ctx):
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(x_NHWC), jnp.asarray(t), jnp.asarray(ctx)))


def hf_forward(model, x_NHWC, t, ctx):
    with torch.no_grad():
        out = model(torch.tensor(x_NHWC.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ctx)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def hf_unets(tmp_path_factory):
    """name -> (diffusers model, its saved folder), built once for the module."""
    out = {}
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        model = UNet2DConditionModel(**{**BASE, **kw}).eval()
        path = tmp_path_factory.mktemp(name) / "unet"
        model.save_pretrained(str(path))
        out[name] = (model, path)
    return out


def inputs(name, batch=2, seed=0, channels=4):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, 8, 8, channels).astype(np.float32)
    ctx = rng.randn(batch, 7, CONFIGS[name]["cross_attention_dim"]).astype(np.float32)
    return x, np.array([999, 17, 500, 1][:batch]), ctx


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_matches_diffusers(hf_unets, name):
    model, path = hf_unets[name]
    x, t, ctx = inputs(name)
    assert_close(forward(conv.from_hf(path), x, t, ctx), hf_forward(model, x, t, ctx), what=f"eps[{name}]")


def test_round_trip_reloads_strictly_with_identical_outputs(hf_unets, tmp_path):
    model, path = hf_unets["sd2"]
    ours = conv.from_hf(path.parent)  # a pipeline-style folder with unet/ inside works too
    conv.to_hf(ours, tmp_path / "back", max_shard_bytes=200_000)  # small shards: exercises the index
    assert (tmp_path / "back" / "diffusion_pytorch_model.safetensors.index.json").exists()
    back, info = UNet2DConditionModel.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in ours.cfg.to_hf().items():
        if key != "_class_name":  # diffusers keeps the constructor's tuples but reloads lists
            want = model.config[key]
            assert back.config[key] == (list(want) if isinstance(want, tuple) else want), key
    x, t, ctx = inputs("sd2", seed=1)
    np.testing.assert_array_equal(hf_forward(back.eval(), x, t, ctx), hf_forward(model, x, t, ctx))
    np.testing.assert_array_equal(forward(conv.from_hf(tmp_path / "back"), x, t, ctx), forward(ours, x, t, ctx))


def test_sharded_forward_equals_single_device_and_remat_changes_nothing(hf_unets):
    _, path = hf_unets["sd1"]
    x, t, ctx = inputs("sd1", seed=2)
    single = forward(conv.from_hf(path), x, t, ctx)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = conv.from_hf(path, mesh=mesh, remat="full")
    spec = sharded.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel.get_value().sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None), spec  # really sharded
    batch = jax.sharding.NamedSharding(mesh, shd.logical_to_spec(("batch",), (2,), mesh))
    with jax.set_mesh(mesh):
        out = np.asarray(_forward(*nnx.split(sharded), jax.device_put(x, batch), t, ctx))
    assert_close(out, single, rel=1e-5, what="sharded eps")


def test_widened_conv_in_ignores_new_channels_and_exports_as_an_8_channel_unet(hf_unets, tmp_path):
    model, path = hf_unets["sd1"]
    x, t, ctx = inputs("sd1", seed=3)
    extra = np.random.RandomState(4).randn(*x.shape).astype(np.float32)
    wide = widen_conv_in(conv.from_hf(path))
    assert wide.cfg.in_channels == 8 and wide.conv_in.kernel.get_value().shape == (3, 3, 8, 32)
    assert_close(forward(wide, np.concatenate([x, extra], -1), t, ctx), hf_forward(model, x, t, ctx),
                 what="widened eps")
    conv.to_hf(wide, tmp_path / "wide")
    back = UNet2DConditionModel.from_pretrained(str(tmp_path / "wide")).eval()
    assert back.config.in_channels == 8
    # once the new channels are trained, ours and the exported model still agree
    wide.conv_in.kernel.set_value(jnp.asarray(np.random.RandomState(5).randn(3, 3, 8, 32).astype(np.float32) * 0.1))
    conv.to_hf(wide, tmp_path / "trained")
    back = UNet2DConditionModel.from_pretrained(str(tmp_path / "trained")).eval()
    both = np.concatenate([x, extra], -1)
    assert_close(forward(wide, both, t, ctx), hf_forward(back, both, t, ctx), what="8-channel eps")


def test_unsupported_configs_and_bad_checkpoints_name_the_problem(hf_unets, tmp_path):
    _, path = hf_unets["sd1"]
    cfg = json.loads((path / "config.json").read_text())
    for key, value in (("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                       ("resnet_time_scale_shift", "scale_shift")):
        with pytest.raises(ValueError, match=key):
            conv.UNetConfig.from_hf({**cfg, key: value})
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        conv.UNetConfig.from_hf({**cfg, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    key = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.bias"
    tensors.pop(key)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        conv.from_hf(bad)
    x, t, ctx = inputs("sd1")
    with pytest.raises(ValueError, match="multiple of 2"):
        forward(conv.from_hf(path), x[:, :7, :7], t, ctx)


# ---------------------------------------------------------------------------------------------------------------
# Whole pipelines: a tiny Stable Diffusion (the sd1 UNet, a small VAE, a small CLIP text encoder and tokenizer).


def tiny_clip(tmp_path):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "c</w>": 4, "a": 5, "b": 6, "c": 7}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    torch.manual_seed(1)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return tokenizer, encoder


@pytest.fixture(scope="module")
def pipeline(hf_unets, tmp_path_factory):
    """A saved diffusers StableDiffusionPipeline folder and the pipeline object (DDIM, SD's scheduler config)."""
    tmp = tmp_path_factory.mktemp("sd")
    tokenizer, encoder = tiny_clip(tmp)
    torch.manual_seed(2)
    vae = HFVAE(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=hf_unets["sd1"][0],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(tmp / "pipeline"))
    return pipe, tmp / "pipeline"


def test_pipeline_conversion_and_guided_sampling_match_the_diffusers_pipeline(pipeline, tmp_path):
    """10 DDIM steps with classifier-free guidance, then the VAE: ours equals StableDiffusionPipeline's image."""
    pipe, folder = pipeline
    sd_conv.from_hf_pipeline(folder, tmp_path / "ours")
    unet = checkpoint.load_module(tmp_path / "ours" / "unet")
    vae = checkpoint.load_module(tmp_path / "ours" / "vae")
    null = np.load(tmp_path / "ours" / sd_conv.NULL_CONDITIONING)
    with torch.no_grad():
        cond, neg = pipe.encode_prompt("a b c", "cpu", 1, True, negative_prompt="")
    assert_close(null, neg[0].numpy(), what="CLIP('')")  # as the pipeline computes it (ours: our JAX CLIP)

    rng = np.random.RandomState(6)
    cond = np.concatenate([cond.numpy(), rng.randn(*cond.shape).astype(np.float32)])  # two prompts
    noise = rng.randn(2, 4, 8, 8).astype(np.float32)
    with torch.no_grad():
        ref = pipe(prompt_embeds=torch.tensor(cond), negative_prompt_embeds=torch.tensor(null)[None].expand(2, -1, -1),
                   latents=torch.tensor(noise), num_inference_steps=10, guidance_scale=7.5, height=16, width=16,
                   output_type="pt").images.numpy().transpose(0, 2, 3, 1)
    latents = dif.sample(unet, dif.DDIM(), jnp.asarray(noise.transpose(0, 2, 3, 1)), jnp.asarray(cond),
                         jnp.asarray(null), num_steps=10, guidance_scale=7.5)
    image = np.clip(np.asarray(vae.decode_latents(latents)) / 2 + 0.5, 0, 1)
    assert_close(image, ref, what="guided image")


@pytest.mark.slow
def test_edit_sampling_matches_the_instruct_pix2pix_pipeline(hf_unets, pipeline, tmp_path):
    """The 8-channel editing UNet, Euler, image + text guidance: ours equals InstructPix2Pix's latents."""
    pipe, folder = pipeline
    torch.manual_seed(7)
    wide = UNet2DConditionModel(**{**BASE, **CONFIGS["sd1"], "in_channels": 8}).eval()
    edit = StableDiffusionInstructPix2PixPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=wide,
        scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    edit.set_progress_bar_config(disable=True)
    wide.save_pretrained(str(tmp_path / "wide"))
    unet = conv.from_hf(tmp_path / "wide")
    vae = sd_conv.vae_conv.from_hf(folder)

    rng = np.random.RandomState(8)
    cond, null = rng.randn(2, 1, 77, 24).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    noise = rng.randn(1, 4, 8, 8).astype(np.float32)
    with torch.no_grad():
        ref = edit(prompt_embeds=torch.tensor(cond), negative_prompt_embeds=torch.tensor(null),
                   image=torch.tensor(image), latents=torch.tensor(noise), num_inference_steps=10,
                   guidance_scale=7.5, image_guidance_scale=1.5, output_type="latent").images.numpy()
    mean, _ = vae.encode(jnp.asarray(image.transpose(0, 2, 3, 1)))  # the pipeline uses the posterior mode, unscaled
    out = dif.sample(unet, dif.EulerDiscrete(), jnp.asarray(noise.transpose(0, 2, 3, 1)), jnp.asarray(cond),
                     jnp.asarray(null), num_steps=10, guidance_scale=7.5, image_latents_BHWC=mean,
                     image_guidance_scale=1.5)
    assert_close(out, ref.transpose(0, 2, 3, 1), what="edited latents")
