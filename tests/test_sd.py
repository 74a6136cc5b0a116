"""Stable Diffusion text-to-image in JAX against diffusers' StableDiffusionPipeline at a tiny random config, and the
pipeline folder's conversion without torch."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image

from convert import stable_diffusion as sd_conv
from genllava_jax import sd, sharding as shd
from micro import tiny_sd_pipeline
from oracle import assert_close

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a b c", "c a"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A saved tiny StableDiffusionPipeline (CLIP text encoder + tokenizer, UNet, VAE, SD's DDIM config)."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def converted(pipeline, tmp_path_factory):
    """The folder converted by `python -m convert.stable_diffusion` in a process where `import torch` fails."""
    out = tmp_path_factory.mktemp("ours") / "sd"
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from convert.stable_diffusion import main\n"
            f"rc = main([{str(pipeline[1])!r}, {str(out)!r}])\n"
            "assert 'torch' not in [m.split('.')[0] for m, v in sys.modules.items() if v is not None], 'torch loaded'\n"
            "sys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_conversion_without_torch_gives_the_pipelines_null_conditioning(pipeline, converted):
    pipe, _ = pipeline
    assert sorted(p.name for p in converted.iterdir()) == [
        "null_conditioning.npy", "scheduler_config.json", "text_encoder", "tokenizer", "unet", "vae"]
    with torch.no_grad():
        _, neg = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True, negative_prompt="")
    null = np.load(converted / sd_conv.NULL_CONDITIONING)
    assert null.shape == (77, 24) and null.dtype == np.float32
    assert_close(null, neg[0].numpy(), what="CLIP('') null conditioning")


def diffusers_images(pipe, noise_NHWC, scheduler, steps, guidance):
    pipe.scheduler = scheduler
    with torch.no_grad():
        return pipe(prompt=PROMPTS, latents=torch.tensor(noise_NHWC.transpose(0, 3, 1, 2)), num_inference_steps=steps,
                    guidance_scale=guidance, height=16, width=16, output_type="np").images


NOISE = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)


GUIDED = dict(latents=NOISE, num_steps=10, guidance_scale=7.5)  # the CLI test draws the same shapes: cached


@pytest.fixture(scope="module")
def single_device_images(converted):
    ours = sd.load(converted, mesh=shd.make_mesh({"data": 1}, [jax.devices()[0]]))
    return ours, sd.text_to_image(ours, PROMPTS, output="float", **GUIDED)


@pytest.mark.slow
def test_text_to_image_equals_the_diffusers_pipeline(pipeline, single_device_images):
    """10 DDIM steps with classifier-free guidance from our converted folder; the same latents."""
    pipe, _ = pipeline
    ref = diffusers_images(pipe, NOISE, DDIMScheduler.from_config(pipe.scheduler.config), 10, 7.5)
    ours, out = single_device_images
    assert out.shape == (2, 16, 16, 3)
    assert_close(out, ref, what="DDIM + CFG image")
    uint8 = sd.text_to_image(ours, PROMPTS, **GUIDED)
    np.testing.assert_array_equal(uint8, (out * 255).round().astype(np.uint8))  # no recompile: same call


@pytest.mark.slow
def test_euler_without_guidance_from_the_diffusers_folder(pipeline):
    """Euler (the folder's DDIM config taken as EulerDiscreteScheduler.from_config: "leading" spacing), guidance 1
    (no CFG), loaded straight from the diffusers folder."""
    pipe, folder = pipeline
    saved = DDIMScheduler.from_pretrained(str(folder / "scheduler")).config  # as a reloaded pipeline has it
    ref = diffusers_images(pipe, NOISE, EulerDiscreteScheduler.from_config(saved), 6, 1.0)
    ours = sd.load(folder, mesh=shd.make_mesh({"data": 1}, [jax.devices()[0]]))
    out = sd.text_to_image(ours, PROMPTS, latents=NOISE, num_steps=6, guidance_scale=1.0, sampler="euler",
                           output="float")
    assert_close(out, ref, what="Euler image, no guidance")


@pytest.mark.slow
def test_sharded_over_devices_equals_single_device(converted, single_device_images):
    """A (data 4, fsdp 2) mesh: the 2 prompts padded to 8 rows, each device its own; the same images."""
    mesh = shd.make_mesh({"data": 4, "fsdp": 2})
    pipe = sd.load(converted, mesh=mesh)
    kernel = pipe.models.unet.conv_in.kernel.get_value()
    assert kernel.sharding.spec == shd.logical_to_spec(("conv_h", "conv_w", "conv_in", "conv_out"), kernel.shape, mesh)
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # really split
    out = sd.text_to_image(pipe, PROMPTS, output="float", **GUIDED)
    np.testing.assert_allclose(out, single_device_images[1], atol=2e-5)


@pytest.mark.slow
def test_bad_arguments_are_clear_errors(converted, tmp_path):
    pipe = sd.load(converted, mesh=shd.make_mesh({"data": 1}, [jax.devices()[0]]))
    with pytest.raises(ValueError, match="multiples of 4"):
        sd.text_to_image(pipe, "a", height=18, width=16)
    with pytest.raises(ValueError, match="sampler='pndm'"):
        sd.text_to_image(pipe, "a", sampler="pndm")
    with pytest.raises(ValueError, match=r"latents of shape \(1, 8, 8, 4\)"):
        sd.text_to_image(pipe, ["a", "b"], latents=NOISE[:1])
    (tmp_path / "no_text").mkdir()
    for p in ("unet", "vae", "scheduler_config.json"):
        os.symlink(converted / p, tmp_path / "no_text" / p)
    with pytest.raises(FileNotFoundError, match="no text_encoder"):
        sd.load(tmp_path / "no_text")


@pytest.mark.slow
def test_cli_writes_one_png_per_prompt(converted, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "genllava_jax.sd", f"--sd={converted}", "--prompt=a b", "--prompt=c",
           f"--out={tmp_path / 'img.png'}", "--steps=10", "--guidance=7.5", "--height=16", "--width=16"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for i in range(2):
        assert Image.open(tmp_path / f"img_{i}.png").size == (16, 16)
    res = subprocess.run(cmd[:3] + [f"--sd={tmp_path / 'missing'}", "--prompt=a"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().endswith("missing: no such folder"), res.stderr


# Stable Diffusion v1's scheduler_config.json (PNDM; no timestep_spacing: DDIM takes "leading", Euler "linspace")
SD_SCHEDULER = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                    skip_prk_steps=True, trained_betas=None)


@pytest.mark.parametrize("config", ["sd", "in_memory_defaults", "v_linear"])
def test_sampler_from_config_is_diffusers_from_config(config):
    from genllava_jax import diffusion as dif

    cfg = {"sd": SD_SCHEDULER,
           # a scheduler built in memory lists the keys it left at its defaults: those do not carry over
           "in_memory_defaults": {**SD_SCHEDULER, "timestep_spacing": "leading", "clip_sample": True,
                                  "_use_default_values": ["timestep_spacing", "clip_sample"]},
           "v_linear": dict(beta_schedule="linear", prediction_type="v_prediction",
                            timestep_spacing="trailing")}[config]
    for kind, cls in (("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)):
        ref, ours = cls.from_config(cfg), dif.sampler_from_config(kind, cfg)
        ref.set_timesteps(7)
        tables = ours.tables(7)
        np.testing.assert_allclose(tables["t"], ref.timesteps.numpy(), rtol=1e-6, err_msg=f"{config} {kind}")
        assert ours.schedule.prediction_type == ref.config.prediction_type
        np.testing.assert_allclose(ours.schedule.alphas_cumprod(), ref.alphas_cumprod.numpy(), rtol=1e-5)
        np.testing.assert_allclose(ours.init_noise_sigma(tables), float(ref.init_noise_sigma), rtol=1e-6)
        if kind == "ddim":
            assert (ours.clip_sample, ours.set_alpha_to_one) == (ref.config.clip_sample, ref.config.set_alpha_to_one)
        else:
            np.testing.assert_allclose(tables["sigma"], ref.sigmas.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        dif.sampler_from_config("euler", {**SD_SCHEDULER, "use_karras_sigmas": True})
