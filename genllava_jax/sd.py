"""Stable Diffusion text-to-image in JAX: prompts -> CLIP text states -> guided DDIM / Euler -> VAE, one jitted call.

    from genllava_jax import sd
    pipe = sd.load("ckpt/sd")  # from `python -m convert.stable_diffusion`, or a diffusers pipeline folder
    images = sd.text_to_image(pipe, ["a red circle", "a cat"], rng=jax.random.key(0), num_steps=50,
                              guidance_scale=7.5, sampler="ddim")  # uint8 (2, 512, 512, 3)

    genllava-sd --sd=ckpt/sd --prompt="a red circle" --out=red.png [--steps=50 --guidance=7.5 --scheduler=ddim
                --height=512 --width=512 --seed=0 --negative_prompt=...]

What StableDiffusionPipeline does, in the same order: prompts and negative prompts ("" by default) tokenized to 77
tokens, the text encoder's last hidden states, noise scaled by the sampler's initial sigma, classifier-free guidance
(when guidance_scale > 1) over the scheduler of the folder's scheduler_config.json taken as DDIM or Euler, the VAE
decode, (x / 2 + 0.5) clipped to [0, 1], then x 255 rounded for uint8. The batch is split over the mesh's (data,
fsdp) devices (padded to a multiple of them); parameters are placed by the sharding rules. Compiles once per
(batch, size, sampler, steps, guidance on/off); the guidance scale is traced.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from genllava_jax import diffusion, errors, sharding as shd

SAMPLERS = ("ddim", "euler")


class Models(nnx.Module):
    """The three networks, split and merged together for the jitted call."""

    def __init__(self, text_encoder, unet, vae):
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae


@dataclasses.dataclass
class Pipeline:
    models: Models
    tokenizer: Any
    scheduler_config: dict
    mesh: jax.sharding.Mesh

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.models.vae.cfg.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.models.unet.cfg.sample_size * self.vae_scale_factor


def load(folder, mesh=None, **overrides) -> Pipeline:
    """A pipeline from our converted folder (unet/, vae/, text_encoder/, tokenizer/, scheduler_config.json) or
    straight from a diffusers folder (converted in memory, no torch). `mesh` default: all devices on the data axis.
    `overrides` set config fields of all three networks (dtype, param_dtype, remat)."""
    from genllava_jax import checkpoint, converter
    from genllava_jax.data.tokenizer import load_clip_tokenizer

    clip_conv, unet_conv, vae_conv = (converter(n) for n in ("clip", "unet", "vae"))
    folder = Path(folder)
    mesh = shd.make_mesh({"data": -1}) if mesh is None else mesh
    ours = (folder / "unet" / "params").is_dir()
    scheduler = folder / ("scheduler_config.json" if ours else "scheduler/scheduler_config.json")
    if not folder.is_dir():
        raise errors.MissingFile(f"{folder}: no such folder")
    for need in (scheduler, folder / "text_encoder", folder / "tokenizer"):
        if not need.exists():
            raise errors.MissingFile(f"{folder}: no {need.relative_to(folder)}; text-to-image needs a Stable Diffusion "
                                    f"folder with a text encoder, a tokenizer and a scheduler config")
    if ours:
        text, unet, vae = (checkpoint.load_module(folder / p, mesh, **overrides)
                           for p in ("text_encoder", "unet", "vae"))
    else:
        text = clip_conv.from_hf(folder / "text_encoder", mesh, towers=("text",), **overrides)
        unet, vae = unet_conv.from_hf(folder, mesh, **overrides), vae_conv.from_hf(folder, mesh, **overrides)
    if text.cfg.text.hidden_size != unet.cfg.cross_attention_dim:
        raise errors.BadValue(f"{folder}: the text encoder's width {text.cfg.text.hidden_size} is not the UNet's "
                         f"cross_attention_dim {unet.cfg.cross_attention_dim}")
    return Pipeline(Models(text, unet, vae), load_clip_tokenizer(folder / "tokenizer"),
                    json.loads(scheduler.read_text()), mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "num_steps", "guided"))
def _generate(graphdef, state, ids_BT, neg_ids_BT, noise_BHWC, guidance_scale, *, sampler, num_steps, guided):
    m = nnx.merge(graphdef, state)
    cond_BLD = m.text_encoder.encode_text(ids_BT).last_hidden_state
    noise_BHWC = shd.constrain(noise_BHWC, ("batch", None, None, None))
    if guided:
        uncond_BLD = m.text_encoder.encode_text(neg_ids_BT).last_hidden_state
        fn = diffusion.guided(m.unet, cond_BLD, uncond_BLD, guidance_scale)
    else:
        fn = lambda x, t: m.unet(x, t, cond_BLD)  # noqa: E731
    latents = diffusion.sample_loop(fn, sampler, num_steps, noise_BHWC)
    return jnp.clip(m.vae.decode_latents(latents).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def text_to_image(pipe: Pipeline, prompts, *, rng=None, num_steps: int = 50, guidance_scale: float = 7.5,
                  sampler: str = "ddim", height: int | None = None, width: int | None = None, negative_prompts=None,
                  latents=None, output: str = "uint8") -> np.ndarray:
    """Images (B, H, W, 3) for a prompt or a list of them: uint8, or with output="float" float32 in [0, 1].

    `latents`: the initial noise (B, H/8, W/8, C) instead of drawing it from `rng` (as the diffusers pipeline's
    `latents=`, NHWC). Height and width default to the UNet's sample size times the VAE's factor."""
    if sampler not in SAMPLERS:
        raise errors.BadValue(f"sampler={sampler!r}: choose one of {SAMPLERS}")
    if output not in ("uint8", "float"):
        raise errors.BadValue(f"output={output!r}: choose 'uint8' or 'float'")
    from genllava_jax.data.tokenizer import clip_tokens

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negative = [""] * len(prompts) if negative_prompts is None else (
        [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts))
    if not prompts or len(negative) != len(prompts):
        raise errors.BadValue(f"{len(prompts)} prompts and {len(negative)} negative prompts: need as many, and at "
                              f"least one")
    m, f = pipe.models, pipe.vae_scale_factor
    height, width = height or pipe.default_size, width or pipe.default_size
    down = f * 2 ** (len(m.unet.cfg.block_out_channels) - 1)
    if height % down or width % down:
        raise errors.BadValue(f"height={height}, width={width}: both must be multiples of {down} (the VAE's and the "
                         f"UNet's downsampling)")
    shape = (len(prompts), height // f, width // f, m.unet.cfg.in_channels)
    if latents is None:
        latents = jax.random.normal(jax.random.key(0) if rng is None else rng, shape, jnp.float32)
    elif tuple(latents.shape) != shape:
        raise errors.BadValue(f"latents of shape {tuple(latents.shape)}; these prompts and sizes need {shape}")
    ids, _ = clip_tokens(pipe.tokenizer, prompts)
    neg_ids, _ = clip_tokens(pipe.tokenizer, negative)
    rows = _batch_size(pipe.mesh)
    padded = -(-len(prompts) // rows) * rows  # every device gets whole rows
    inputs = [_pad(np.asarray(x), padded) for x in (ids, neg_ids, latents)]
    inputs = [jax.device_put(x, NamedSharding(pipe.mesh, shd.logical_to_spec(
        ("batch",) + (None,) * (x.ndim - 1), x.shape, pipe.mesh))) for x in inputs]
    graphdef, state = nnx.split(m)
    with jax.set_mesh(pipe.mesh):
        out = _generate(graphdef, state, *inputs, jnp.float32(guidance_scale),
                        sampler=diffusion.sampler_from_config(sampler, pipe.scheduler_config), num_steps=num_steps,
                        guided=guidance_scale > 1.0)
    images = np.asarray(out)[:len(prompts)]
    return images if output == "float" else (images * 255).round().astype(np.uint8)


def _batch_size(mesh) -> int:
    """Rows a batch must be a multiple of to split evenly over the mesh axes that "batch" maps to."""
    axes = dict(shd.current_rules())["batch"]
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)]) if rows > len(x) else x


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def main(argv=None):
    from absl import flags

    flags.DEFINE_string("sd", None, "a converted (python -m convert.stable_diffusion) or diffusers SD folder")
    flags.DEFINE_multi_string("prompt", [], "what to draw; repeat for a batch (files get _0, _1, ... suffixes)")
    flags.DEFINE_string("negative_prompt", "", "the unconditional prompt of classifier-free guidance")
    flags.DEFINE_string("out", "out.png", "where the image goes")
    flags.DEFINE_integer("steps", 50, "sampling steps")
    flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale (<= 1: none)")
    flags.DEFINE_enum("scheduler", "ddim", list(SAMPLERS), "sampler, with the folder's scheduler config")
    flags.DEFINE_integer("height", None, "pixels (default: the UNet's sample size x the VAE's factor)")
    flags.DEFINE_integer("width", None, "pixels")
    flags.DEFINE_integer("seed", 0, "noise seed")
    errors.run(_main, argv)


def _main(argv):
    from absl import flags
    from PIL import Image

    del argv
    F = flags.FLAGS
    if not F.sd or not F.prompt:
        raise errors.UserError("--sd and --prompt are required")
    images = text_to_image(load(F.sd), F.prompt, rng=jax.random.key(F.seed), num_steps=F.steps,
                           guidance_scale=F.guidance, sampler=F.scheduler, height=F.height, width=F.width,
                           negative_prompts=F.negative_prompt)
    out = Path(F.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_stem(f"{out.stem}_{i}")
        Image.fromarray(image).save(path)
        print(path)


if __name__ == "__main__":
    main()
