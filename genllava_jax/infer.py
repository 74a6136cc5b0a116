"""Inference with the joint model: answers (understanding) and images (generation, editing), each one jitted call.

Both take the fixed-shape rows the data pipeline makes (`Encoder.example`): answers are decoded after the prompt
(everything before the first labelled token, moved to left padding); images are conditioned on the teacher-forced
`[SOI][IMG0..N-1]` of the row (the LLM is causal, so what follows them does not matter), as GILL does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genllava_jax import diffusion
from genllava_jax.data.template import IGNORE
from genllava_jax.models import mistral


def left_padded_prompts(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of each row's prompt (tokens before its first label), left-padded."""
    ids, labels = np.asarray(batch["input_ids"]), np.asarray(batch["labels"])
    B, T = ids.shape
    lengths = np.where((labels != IGNORE).any(1), (labels != IGNORE).argmax(1), np.asarray(batch["attention_mask"]).sum(1))
    out_ids, out_mask = np.zeros_like(ids), np.zeros_like(ids)
    for b, n in enumerate(lengths):
        out_ids[b, T - n:], out_mask[b, T - n:] = ids[b, :n], 1
    return out_ids, out_mask


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id", "temperature"))
def _answer(graphdef, state, ids, mask, image, has_image, rng, *, max_new_tokens, eos_id, pad_id, temperature):
    model = nnx.merge(graphdef, state)
    embeds = model.embed_inputs(ids, image, has_image)
    return mistral.decode(model.llm, mask, rng, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                          temperature=temperature, eos_id=eos_id, pad_id=pad_id)


def answer(model, batch: dict, *, max_new_tokens: int = 16, eos_id: int | None = None, pad_id: int = 0,
           temperature: float = 0.0, rng=None) -> np.ndarray:
    """New tokens (B, max_new_tokens) answering each row's prompt (greedy by default)."""
    ids, mask = left_padded_prompts(batch)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    return np.asarray(_answer(graphdef, state, ids, mask, batch["image"], batch["has_image"], rng,
                              max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                              temperature=float(temperature)))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "num_steps"))
def _images(graphdef, state, batch, rng, guidance_scale, image_guidance_scale, *, sampler, num_steps):
    model = nnx.merge(graphdef, state)
    cond = model.condition(batch["input_ids"], batch["attention_mask"], batch["image"], batch["has_image"])
    vae, unet = model.vae, model.unet
    B, size = cond.shape[0], batch["target_image"].shape[1] // 2 ** (len(vae.cfg.block_out_channels) - 1)
    noise = jax.random.normal(rng, (B, size, size, vae.cfg.latent_channels), jnp.float32)
    null = model.null_cond[...]
    if model.cfg.edit_mode == "latent_concat":
        src = vae.latents(batch["source_image"])
        fn = diffusion.guided(unet, cond, null, guidance_scale, src, image_guidance_scale)
    else:
        fn = diffusion.guided(unet, cond, null, guidance_scale)
    latents = diffusion.sample_loop(fn, sampler, num_steps, noise)
    return jnp.clip(vae.decode_latents(latents), -1.0, 1.0)


def images(model, batch: dict, *, rng=None, num_steps: int = 50, guidance_scale: float = 7.5,
           image_guidance_scale: float = 1.5, sampler: str = "ddim") -> np.ndarray:
    """uint8 images (B, H, W, 3) generated from each row's [IMG] states (classifier-free guided)."""
    samplers = {"ddim": diffusion.DDIM, "euler": diffusion.EulerDiscrete}
    if sampler not in samplers:
        raise ValueError(f"sampler={sampler!r}: choose one of {sorted(samplers)}")
    graphdef, state = nnx.split(model)
    keys = ("input_ids", "attention_mask", "image", "has_image", "target_image", "source_image")
    x = _images(graphdef, state, {k: jnp.asarray(batch[k]) for k in keys},
                jax.random.key(0) if rng is None else rng, jnp.float32(guidance_scale),
                jnp.float32(image_guidance_scale), sampler=samplers[sampler](model.cfg.schedule), num_steps=num_steps)
    return np.asarray((np.asarray(x) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def image_grid(images_BHWC: np.ndarray, cols: int = 8) -> np.ndarray:
    B, H, W, C = images_BHWC.shape
    rows = -(-B // cols)
    grid = np.full((rows * (H + 2), cols * (W + 2), C), 255, np.uint8)
    for i, im in enumerate(images_BHWC):
        r, c = divmod(i, cols)
        grid[r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = im
    return grid
