"""Noise schedules and samplers against diffusers' schedulers, step by step, with a fixed fake model (float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from genllava_jax import diffusion as dif
from oracle import assert_close

# Stable Diffusion v1's scheduler_config.json (a PNDM config, which the pipelines reuse for DDIM and Euler)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                    trained_betas=None)


def fake_model_torch(x, t):
    return torch.tanh(0.7 * x + float(t) / 1000.0) * 0.9 + 0.05 * x


def fake_model_jax(x, t):
    return jnp.tanh(0.7 * x + t / 1000.0) * 0.9 + 0.05 * x


def diffusers_trajectory(sched, num_steps, noise_nchw):
    sched.set_timesteps(num_steps)
    x = torch.tensor(noise_nchw) * sched.init_noise_sigma
    xs = []
    for t in sched.timesteps:
        out = fake_model_torch(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
        xs.append(x.numpy())
    return np.stack(xs).transpose(0, 1, 3, 4, 2), sched.timesteps.numpy()


def our_trajectory(sampler, num_steps, noise_nchw):
    run = jax.jit(lambda n: dif.sample_loop(fake_model_jax, sampler, num_steps, n, trajectory=True))
    return np.asarray(run(jnp.asarray(noise_nchw.transpose(0, 2, 3, 1))))


NOISE = np.random.RandomState(0).randn(2, 4, 6, 5).astype(np.float32)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_training_schedule_add_noise_and_velocity(beta_schedule):
    hf = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    ours = dif.NoiseSchedule(beta_schedule=beta_schedule)
    np.testing.assert_allclose(ours.betas(), hf.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.alphas_cumprod(), hf.alphas_cumprod.numpy(), rtol=1e-5)
    rng = np.random.RandomState(1)
    x0, noise = rng.randn(2, 3, 4, 5, 6).astype(np.float32)  # NCHW for torch; ours gets NHWC
    t = np.array([0, 517, 999])
    ref = hf.add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
    out = dif.add_noise(ours, jnp.asarray(x0.transpose(0, 2, 3, 1)), jnp.asarray(noise.transpose(0, 2, 3, 1)),
                        jnp.asarray(t))
    assert_close(out, ref.transpose(0, 2, 3, 1), rel=1e-6, what="add_noise")
    ref_v = hf.get_velocity(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
    out_v = dif.velocity(ours, jnp.asarray(x0.transpose(0, 2, 3, 1)), jnp.asarray(noise.transpose(0, 2, 3, 1)),
                         jnp.asarray(t))
    assert_close(out_v, ref_v.transpose(0, 2, 3, 1), rel=1e-6, what="velocity")


def test_defaults_are_stable_diffusions_scheduler_config():
    hf = DDIMScheduler.from_config(SD_SCHEDULER)
    ddim = dif.DDIM()
    assert (hf.config.timestep_spacing, hf.config.steps_offset, hf.config.set_alpha_to_one,
            hf.config.clip_sample) == (ddim.timestep_spacing, ddim.steps_offset, ddim.set_alpha_to_one,
                                       ddim.clip_sample)
    euler = EulerDiscreteScheduler.from_config(SD_SCHEDULER)
    assert euler.config.timestep_spacing == dif.EulerDiscrete().timestep_spacing
    s = dif.NoiseSchedule()
    assert (s.beta_start, s.beta_end, s.beta_schedule) == (0.00085, 0.012, "scaled_linear")


DDIM_CASES = {
    "sd": ({}, {}),
    "trailing_v": (dict(timestep_spacing="trailing", prediction_type="v_prediction", steps_offset=0),
                   dict(timestep_spacing="trailing", steps_offset=0)),
    "linspace_clip_alpha1": (dict(timestep_spacing="linspace", clip_sample=True, set_alpha_to_one=True,
                                  beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
                             dict(timestep_spacing="linspace", clip_sample=True, set_alpha_to_one=True)),
}


def _ours(cls, hf_kw, sampler_kw):
    sched_fields = {f.name for f in dataclasses.fields(dif.NoiseSchedule)}
    schedule = dif.NoiseSchedule(**{**{k: v for k, v in SD_SCHEDULER.items() if k in sched_fields},
                                    **{k: v for k, v in hf_kw.items() if k in sched_fields}})
    return cls(schedule=schedule, **sampler_kw)


@pytest.mark.parametrize("case", sorted(DDIM_CASES))
@pytest.mark.parametrize("num_steps", [10, 7])
def test_ddim_trajectory_matches_diffusers(case, num_steps):
    hf_kw, sampler_kw = DDIM_CASES[case]
    hf = DDIMScheduler.from_config({**SD_SCHEDULER, **hf_kw})
    ref, timesteps = diffusers_trajectory(hf, num_steps, NOISE)
    sampler = _ours(dif.DDIM, hf_kw, sampler_kw)
    np.testing.assert_array_equal(sampler.tables(num_steps)["t"], timesteps)
    out = our_trajectory(sampler, num_steps, NOISE)
    for i in range(num_steps):
        assert_close(out[i], ref[i], rel=1e-5, what=f"DDIM[{case}] step {i}")


EULER_CASES = {
    "sd": ({}, {}),
    "leading_v": (dict(timestep_spacing="leading", prediction_type="v_prediction"), dict(timestep_spacing="leading")),
    "trailing": (dict(timestep_spacing="trailing"), dict(timestep_spacing="trailing")),
}


@pytest.mark.parametrize("case", sorted(EULER_CASES))
@pytest.mark.parametrize("num_steps", [10, 7])
def test_euler_trajectory_matches_diffusers(case, num_steps):
    hf_kw, sampler_kw = EULER_CASES[case]
    hf = EulerDiscreteScheduler.from_config({**SD_SCHEDULER, **hf_kw})
    ref, timesteps = diffusers_trajectory(hf, num_steps, NOISE)
    sampler = _ours(dif.EulerDiscrete, hf_kw, sampler_kw)
    tables = sampler.tables(num_steps)
    np.testing.assert_array_equal(tables["t"], timesteps)
    np.testing.assert_allclose(tables["sigma"], hf.sigmas.numpy(), rtol=1e-6)
    assert sampler.init_noise_sigma(tables) == pytest.approx(float(hf.init_noise_sigma), rel=1e-6)
    out = our_trajectory(sampler, num_steps, NOISE)
    for i in range(num_steps):
        assert_close(out[i], ref[i], rel=1e-5, what=f"Euler[{case}] step {i}")


def fake_unet_torch(x, t, ctx):
    """A stand-in for the UNet whose output depends on every input (latents, timestep, conditioning)."""
    return torch.tanh(x[:, :4] * ctx.mean((1, 2))[:, None, None, None] + float(t) / 500) + 0.1 * x[:, -4:]


def fake_unet_jax(x, t, ctx):
    return jnp.tanh(x[..., :4] * ctx.mean((1, 2))[:, None, None, None] + t / 500) + 0.1 * x[..., -4:]


@pytest.mark.parametrize("edit", [False, True])
def test_guidance_matches_the_diffusers_pipeline_loops(edit):
    """Text CFG as StableDiffusionPipeline, and the three-way image + text CFG as InstructPix2Pix's loop."""
    rng = np.random.RandomState(2)
    cond, uncond = rng.randn(2, 7, 3).astype(np.float32), rng.randn(1, 7, 3).astype(np.float32)
    image = rng.randn(2, 4, 6, 5).astype(np.float32)
    g, g_img = 7.5, 1.5
    hf = EulerDiscreteScheduler.from_config(SD_SCHEDULER)
    hf.set_timesteps(6)
    latents = torch.tensor(NOISE) * hf.init_noise_sigma
    c, u, img = torch.tensor(cond), torch.tensor(uncond).expand(2, -1, -1), torch.tensor(image)
    for t in hf.timesteps:  # the pipelines' loops, verbatim in structure
        if edit:
            inp = torch.cat([hf.scale_model_input(torch.cat([latents] * 3), t),
                             torch.cat([img, img, torch.zeros_like(img)])], dim=1)
            e_text, e_image, e_uncond = fake_unet_torch(inp, t, torch.cat([c, u, u])).chunk(3)
            eps = e_uncond + g * (e_text - e_image) + g_img * (e_image - e_uncond)
        else:
            inp = hf.scale_model_input(torch.cat([latents] * 2), t)
            e_uncond, e_text = fake_unet_torch(inp, t, torch.cat([u, c])).chunk(2)
            eps = e_uncond + g * (e_text - e_uncond)
        latents = hf.step(eps, t, latents).prev_sample
    ref = latents.numpy().transpose(0, 2, 3, 1)

    fn = dif.guided(fake_unet_jax, jnp.asarray(cond), jnp.asarray(uncond[0]), g,
                    jnp.asarray(image.transpose(0, 2, 3, 1)) if edit else None, g_img)
    out = jax.jit(lambda n: dif.sample_loop(fn, dif.EulerDiscrete(), 6, n))(jnp.asarray(NOISE.transpose(0, 2, 3, 1)))
    assert_close(out, ref, rel=1e-5, what="guided latents")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        dif.NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="sample"):
        dif.NoiseSchedule(prediction_type="sample")
    with pytest.raises(ValueError, match="num_steps=1001"):
        dif.DDIM().tables(1001)
    with pytest.raises(ValueError, match="karras"):
        dif.EulerDiscrete(timestep_spacing="karras").tables(10)
