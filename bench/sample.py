"""Guided sampling: our jitted DDIM loop (one lax.scan) vs the same loop over diffusers' UNet and DDIMScheduler.

    .venv/bin/python bench/sample.py            # prints a Markdown row and stores it in BENCHMARKS.md

Same weights (converted), same noise and conditioning, 25 steps, classifier-free guidance 7.5 (a doubled batch per
step), as StableDiffusionPipeline's loop. Compile time is excluded for JAX (reported separately); torch gets one
warm-up run too. Both run on this CPU in float32.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from bench_util import record
from convert import unet as conv
from genllava_jax import diffusion as dif

CONFIG = dict(sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=16,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
              attention_head_dim=4)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


NOTE = ("Most of the work is 3×3 convolutions, where XLA:CPU was measured at about 170 GFLOP/s against oneDNN's "
        "267 (DESIGN.md §3); that likely explains torch's lead on this CPU (not profiled). The machine was shared.")


def torch_sample(unet, scheduler, noise, cond, uncond, steps, scale):
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            e_uncond, e_cond = unet(inp, t, context).sample.chunk(2)
            latents = scheduler.step(e_uncond + scale * (e_cond - e_uncond), t, latents).prev_sample
    return latents


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    hf = UNet2DConditionModel(**CONFIG).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    ours = conv.from_hf(path)
    rng = np.random.RandomState(0)
    size = CONFIG["sample_size"]
    noise = rng.randn(a.batch, 4, size, size).astype(np.float32)
    cond = rng.randn(a.batch, 77, CONFIG["cross_attention_dim"]).astype(np.float32)
    uncond = rng.randn(1, 77, CONFIG["cross_attention_dim"]).astype(np.float32)

    def run_ours():
        return jax.block_until_ready(dif.sample(ours, dif.DDIM(), jnp.asarray(noise.transpose(0, 2, 3, 1)),
                                                jnp.asarray(cond), jnp.asarray(uncond), num_steps=a.steps))

    t0 = time.perf_counter()
    run_ours()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        out = run_ours()
    jax_s = (time.perf_counter() - t0) / a.repeats

    sched = DDIMScheduler(**SCHEDULER)
    args = (hf, sched, torch.tensor(noise), torch.tensor(cond), torch.tensor(uncond).expand(a.batch, -1, -1),
            a.steps, 7.5)
    torch_sample(*args)
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        ref = torch_sample(*args)
    torch_s = (time.perf_counter() - t0) / a.repeats
    ref = ref.numpy().transpose(0, 2, 3, 1)
    rel = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    n = sum(p.numel() for p in hf.parameters()) / 1e6
    record("sample", f"python bench/sample.py --batch {a.batch} --steps {a.steps}",
           ["config", "ours s/run", "diffusers s/run", "ratio (diffusers/ours)", "max rel diff", "our compile s"],
           [f"UNet {CONFIG['block_out_channels']}×{CONFIG['layers_per_block']} ({n:.1f}M params), "
            f"{size}×{size} latents, batch {a.batch} (+CFG), DDIM {a.steps} steps",
            f"{jax_s:.2f}", f"{torch_s:.2f}", f"{torch_s / jax_s:.2f}×", f"{rel:.1e}", f"{compile_s:.1f}"],
           note=NOTE)


if __name__ == "__main__":
    main()
