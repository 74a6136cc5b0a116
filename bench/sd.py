"""Stable Diffusion text-to-image: our jitted pipeline (genllava_jax.sd) vs diffusers' StableDiffusionPipeline.

    .venv/bin/python bench/sd.py            # prints a Markdown row and stores it in BENCHMARKS.md

A small random SD (CLIP text encoder, UNet, VAE) saved as a diffusers folder and converted to ours; the same
prompts, the same initial latents, DDIM with classifier-free guidance, the whole pipeline each side (tokenize,
encode prompts and the empty negative prompt, sample, decode). Our compile time is reported apart; both sides get
one warm-up run, then the runs alternate (the median of each side is reported). Both run on this CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bench_util import record
from convert import stable_diffusion as sd_conv
from genllava_jax import sd, sharding as shd

UNET = dict(sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
            attention_head_dim=4)
VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
WORDS = ["a", "red", "blue", "circle", "square", "on", "grey", "background", "small", "large"]
PROMPTS = ["a red circle on grey", "a small blue square", "a large red square on blue", "a blue circle"]


def build(folder: Path) -> StableDiffusionPipeline:
    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for w in WORDS:  # whole words: one merge chain each (its pieces in the vocabulary, as BPE requires)
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        head = parts[0]
        vocab.setdefault(head, len(vocab))
        for part in parts[1:]:
            vocab.setdefault(part, len(vocab))
            merges.append(f"{head} {part}")
            head += part
            vocab.setdefault(head, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab),
                                                                                    **TEXT)).eval(),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**UNET).eval(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder / "pipeline"))
    return pipe


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    load = os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp())
    pipe = build(folder)
    sd_conv.from_hf_pipeline(folder / "pipeline", folder / "ours")
    ours = sd.load(folder / "ours", mesh=shd.make_mesh({"data": 1}, jax.devices()[:1]))
    prompts = (PROMPTS * a.batch)[:a.batch]
    size = UNET["sample_size"] * 2 ** (len(VAE["block_out_channels"]) - 1)
    latents = np.random.RandomState(0).randn(a.batch, UNET["sample_size"], UNET["sample_size"], 4).astype(np.float32)
    kw = dict(num_steps=a.steps, guidance_scale=7.5, sampler="ddim", height=size, width=size)

    def run_ours():
        return sd.text_to_image(ours, prompts, latents=latents, output="float", **kw)

    def run_diffusers():
        with torch.no_grad():
            return pipe(prompt=prompts, latents=torch.tensor(latents.transpose(0, 3, 1, 2)), height=size, width=size,
                        num_inference_steps=a.steps, guidance_scale=7.5, output_type="np").images

    def timed(fn):
        t0 = time.perf_counter()
        return fn(), time.perf_counter() - t0

    _, compile_s = timed(run_ours)
    run_diffusers()
    times = {"ours": [], "diffusers": []}
    for _ in range(a.repeats):  # interleaved, so that a change in the machine's load hits both sides alike
        out, t = timed(run_ours)
        times["ours"].append(t)
        ref, t = timed(run_diffusers)
        times["diffusers"].append(t)
    jax_s, torch_s = (float(np.median(times[k])) for k in ("ours", "diffusers"))
    times = {k: [round(t, 1) for t in v] for k, v in times.items()}
    print(times)
    diff = float(np.abs(out - ref).max())
    n = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()) / 1e6
    record("sd", f"python bench/sd.py --batch {a.batch} --steps {a.steps}",
           ["config", "ours images/s", "diffusers images/s", "ratio (ours/diffusers)", "max |Δ| pixels [0,1]",
            "our compile s"],
           [f"SD: CLIP text 4L×128, UNet {UNET['block_out_channels']}×2, VAE {VAE['block_out_channels']} "
            f"({n:.1f}M params), {size}×{size} images, batch {a.batch}, DDIM {a.steps} steps + CFG 7.5",
            f"{a.batch / jax_s:.3g}", f"{a.batch / torch_s:.3g}", f"{torch_s / jax_s:.2f}×", f"{diff:.1e}",
            f"{compile_s:.1f}"],
           note=f"The whole pipeline each side, the same latents; float32 on this CPU; seconds per run (the two "
                f"alternating): {times}; torch {torch.get_num_threads()} thread(s). The machine "
                f"was shared (1-minute load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, on "
                f"{os.cpu_count()} cores).")


if __name__ == "__main__":
    main()
