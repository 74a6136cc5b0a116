"""Noise schedules and samplers for latent diffusion, mirroring diffusers' DDPM, DDIM and Euler-discrete schedulers.

Everything that depends only on the schedule and the step count (timesteps, alphas, sigmas) is tabulated once in
numpy float32, as diffusers does; the jitted loop (`lax.scan`) only indexes those tables. Latents are NHWC.
Defaults are Stable Diffusion's scheduler config: scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon
prediction, DDIM with "leading" spacing and steps_offset 1, Euler with "linspace" spacing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genllava_jax import errors


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM training schedule (diffusers' beta_schedule "linear" or "scaled_linear")."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # or "v_prediction"

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule={self.beta_schedule!r}: only 'linear' and 'scaled_linear' are supported")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={self.prediction_type!r}: only 'epsilon' and 'v_prediction'")

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float32) ** 2

    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas(), dtype=np.float32)


def _bcast(a_B: jax.Array, x: jax.Array) -> jax.Array:
    return a_B.reshape(a_B.shape + (1,) * (x.ndim - a_B.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t_B: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise, per example timestep t_B."""
    ac = jnp.asarray(schedule.alphas_cumprod())[t_B]
    return _bcast(ac ** 0.5, x0) * x0 + _bcast((1 - ac) ** 0.5, x0) * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t_B: jax.Array) -> jax.Array:
    """The v-prediction target: sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0."""
    ac = jnp.asarray(schedule.alphas_cumprod())[t_B]
    return _bcast(ac ** 0.5, x0) * noise - _bcast((1 - ac) ** 0.5, x0) * x0


def _spaced(spacing: str, num_train: int, num_steps: int, offset: int) -> np.ndarray:
    """Inference timesteps, descending, as diffusers' `set_timesteps` (float64; callers round or cast)."""
    if not 0 < num_steps <= num_train:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={num_train}]")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, num_steps) * (num_train // num_steps)).round()[::-1] + offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1
    raise ValueError(f"timestep_spacing={spacing!r}: choose 'linspace', 'leading' or 'trailing'")


@dataclasses.dataclass(frozen=True)
class DDIM:
    """Deterministic DDIM (eta = 0), as `diffusers.DDIMScheduler`."""

    schedule: NoiseSchedule = NoiseSchedule()
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        s = self.schedule
        spacing = self.timestep_spacing
        t = _spaced(spacing, s.num_train_timesteps, num_steps, self.steps_offset)
        t = (t.round() if spacing == "linspace" else t).astype(np.int64)
        ac = s.alphas_cumprod()
        prev = t - s.num_train_timesteps // num_steps  # diffusers' step uses this offset for every spacing
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        return {"t": t.astype(np.float32), "alpha": ac[t],
                "alpha_prev": np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)}

    def init_noise_sigma(self, tables) -> float:
        return 1.0

    def scale_input(self, tables, i, x):
        return x

    def step(self, tables, i, x, out):
        a, a_prev = tables["alpha"][i], tables["alpha_prev"][i]
        b = 1 - a
        if self.schedule.prediction_type == "epsilon":
            x0, eps = (x - b ** 0.5 * out) / a ** 0.5, out
        else:
            x0, eps = a ** 0.5 * x - b ** 0.5 * out, a ** 0.5 * out + b ** 0.5 * x
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


@dataclasses.dataclass(frozen=True)
class EulerDiscrete:
    """Euler steps in sigma space, as `diffusers.EulerDiscreteScheduler` (linear interpolation, no churn)."""

    schedule: NoiseSchedule = NoiseSchedule()
    timestep_spacing: str = "linspace"
    steps_offset: int = 1

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        s = self.schedule
        t = _spaced(self.timestep_spacing, s.num_train_timesteps, num_steps, self.steps_offset).astype(np.float32)
        ac = s.alphas_cumprod()
        sigmas = np.interp(t, np.arange(len(ac)), ((1 - ac) / ac) ** 0.5)
        return {"t": t, "sigma": np.concatenate([sigmas, [0.0]]).astype(np.float32)}

    def init_noise_sigma(self, tables) -> float:
        top = float(np.max(tables["sigma"]))
        return top if self.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    def scale_input(self, tables, i, x):
        return x / (tables["sigma"][i] ** 2 + 1) ** 0.5

    def step(self, tables, i, x, out):
        sigma, sigma_next = tables["sigma"][i], tables["sigma"][i + 1]
        if self.schedule.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        return x + (x - x0) / sigma * (sigma_next - sigma)


Sampler = DDIM | EulerDiscrete

# what a diffusers scheduler config may set beyond our fields, with the only value we implement
_UNSUPPORTED = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
                "sigma_min": None, "sigma_max": None}


def sampler_from_config(kind: str, config: dict) -> Sampler:
    """`DDIMScheduler.from_config(config)` ("ddim") or `EulerDiscreteScheduler.from_config(config)` ("euler") as
    ours: the keys the class knows are taken, missing ones (and those the saving class had at its defaults, listed in
    `_use_default_values`) get this class's defaults, as diffusers does: e.g. SD's PNDM scheduler_config.json gives
    the DDIM and Euler the pipelines use. A feature we lack is an error."""
    if kind not in ("ddim", "euler"):
        raise errors.BadValue(f"sampler={kind!r}: choose 'ddim' or 'euler'")
    # keys the saving class left at its own defaults do not carry over to another class (diffusers' from_config)
    config = {k: v for k, v in config.items() if k not in config.get("_use_default_values", ())}
    for key, ok in _UNSUPPORTED.items():
        if config.get(key, ok) != ok:
            raise errors.BadValue(f"scheduler config {key}={config[key]!r} is not supported (only {ok!r})")
    get = lambda k, default: config.get(k, default)
    schedule = NoiseSchedule(num_train_timesteps=get("num_train_timesteps", 1000),
                             beta_start=get("beta_start", 0.0001), beta_end=get("beta_end", 0.02),
                             beta_schedule=get("beta_schedule", "linear"),
                             prediction_type=get("prediction_type", "epsilon"))
    if kind == "ddim":
        return DDIM(schedule, timestep_spacing=get("timestep_spacing", "leading"), steps_offset=get("steps_offset", 0),
                    set_alpha_to_one=get("set_alpha_to_one", True), clip_sample=get("clip_sample", True),
                    clip_sample_range=get("clip_sample_range", 1.0))
    return EulerDiscrete(schedule, timestep_spacing=get("timestep_spacing", "linspace"),
                         steps_offset=get("steps_offset", 0))


def sample_loop(model_fn: Callable, sampler: Sampler, num_steps: int, noise: jax.Array, *,
                trajectory: bool = False):
    """Runs the reverse process from standard-normal `noise` (scaled here by the sampler's init_noise_sigma).

    `model_fn(x_scaled, t) -> model output` with a scalar timestep t. Returns the final latents, or with
    `trajectory` the latents after every step stacked on a leading axis. Traceable: call it under `jax.jit`.
    """
    np_tables = sampler.tables(num_steps)
    tables = {k: jnp.asarray(v) for k, v in np_tables.items()}
    x = noise * jnp.float32(sampler.init_noise_sigma(np_tables))

    def body(x, i):
        out = model_fn(sampler.scale_input(tables, i, x), tables["t"][i])
        x = sampler.step(tables, i, x, out.astype(x.dtype))
        return x, (x if trajectory else None)

    x, xs = jax.lax.scan(body, x, jnp.arange(num_steps))
    return xs if trajectory else x


def guided(unet, cond_BLD, uncond_BLD, guidance_scale, image_latents=None, image_guidance_scale=None) -> Callable:
    """The model function of classifier-free guidance, one UNet call on a stacked batch per step.

    Text only: batch (uncond, cond), eps = u + g (c - u), as StableDiffusionPipeline. With `image_latents`
    (InstructPix2Pix, an 8-channel UNet): batch (cond + image, uncond + image, uncond + zeros) with the image
    latents concatenated on channels after input scaling, eps = u + g (c - i) + g_img (i - u).
    """
    uncond_BLD = jnp.broadcast_to(uncond_BLD, cond_BLD.shape).astype(cond_BLD.dtype)
    if image_latents is None:
        context = jnp.concatenate([uncond_BLD, cond_BLD])

        def fn(x, t):
            e_uncond, e_cond = jnp.split(unet(jnp.concatenate([x, x]), t, context), 2)
            return e_uncond + guidance_scale * (e_cond - e_uncond)

        return fn

    context = jnp.concatenate([cond_BLD, uncond_BLD, uncond_BLD])
    image = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)]).astype(cond_BLD.dtype)

    def fn(x, t):
        x3 = jnp.concatenate([jnp.concatenate([x, x, x]), image], axis=-1)
        e_text, e_image, e_uncond = jnp.split(unet(x3, t, context), 3)
        return e_uncond + guidance_scale * (e_text - e_image) + image_guidance_scale * (e_image - e_uncond)

    return fn


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "num_steps"))
def _sample(graphdef, state, sampler, num_steps, noise, cond, uncond, guidance_scale, image_latents,
            image_guidance_scale):
    unet = nnx.merge(graphdef, state)
    fn = (lambda x, t: unet(x, t, cond)) if uncond is None else guided(unet, cond, uncond, guidance_scale,
                                                                        image_latents, image_guidance_scale)
    return sample_loop(fn, sampler, num_steps, noise)


def sample(unet: nnx.Module, sampler: Sampler, noise_BHWC: jax.Array, cond_BLD: jax.Array,
           uncond_BLD: jax.Array | None = None, *, num_steps: int = 50, guidance_scale: float = 7.5,
           image_latents_BHWC: jax.Array | None = None, image_guidance_scale: float = 1.5) -> jax.Array:
    """Final latents (B, H, W, C) from noise, one jitted loop; compiles once per (shapes, sampler, num_steps).

    `uncond_BLD` (the null conditioning, (L, D) or (B, L, D)) switches classifier-free guidance on; the scales are
    traced, so changing them does not recompile. `image_latents_BHWC` selects the InstructPix2Pix guidance.
    """
    if image_latents_BHWC is not None and uncond_BLD is None:
        raise ValueError("image guidance (image_latents_BHWC) needs the null conditioning uncond_BLD")
    graphdef, state = nnx.split(unet)
    return _sample(graphdef, state, sampler, num_steps, noise_BHWC, cond_BLD, uncond_BLD,
                   jnp.float32(guidance_scale), image_latents_BHWC, jnp.float32(image_guidance_scale))
