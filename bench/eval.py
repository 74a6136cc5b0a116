"""Evaluation samples/s: our jitted sweep path vs HF-style eager `generate` on the same small model, same run.

    .venv/bin/python bench/eval.py [--workdir runs/demo/train] [--n 128] [--batch 16] [--new 16] [--print_only]

The model is configs/tiny.py freshly initialised (or a trained run given by --workdir, e.g. runs/demo/train); the
benchmark a GQA-format file of its synthetic world's held-out scenes (`evaluate.synthetic.write_gqa`).
Ours: `sweep.CellRunner` (bucketed, fixed-shape batches, one jitted prefill + while_loop decode per batch, on all
local devices), timed on a second pass so compilation is excluded (reported apart).
HF: the model's vision tower, projector and LLM exported with convert's `to_hf`, loaded as `SiglipVisionModel`, a
torch Linear·GELU·Linear and `MistralForCausalLM`; the image features are spliced at the `<image>` positions and
`generate(inputs_embeds=..., attention_mask=...)` decodes greedily, batch by batch (the same batches without our
padding rows, left-padded, the same stop tokens and max_new_tokens), after one warm-up batch; timed with 1 thread and
with torch's default count, the faster kept.
Both sides load and preprocess the images, share the tokenized prompts and decode the answers to text.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_util import record, tiny_config


def fresh_tiny(tmp: Path, mesh, buckets):
    """(Assistant on configs/tiny.py freshly initialised, its synthetic world) when no trained run is given."""
    from genllava_jax import infer, train

    c = tiny_config(tmp / "world")
    _, model, tokenizer, _ = train.build(c, mesh)
    return infer.Assistant(model, tokenizer, c.data, length_buckets=buckets), tmp / "world"


def hf_model(model, folder: Path):
    """(SiglipVisionModel, projector, MistralForCausalLM) from our parts via convert's to_hf."""
    from transformers import MistralForCausalLM, SiglipVisionModel

    from convert import mistral, projector, siglip
    from convert.torch_genllava import torch_projector

    siglip.to_hf(model.vision, folder / "siglip")
    projector.to_hf(model.projector, folder / "projector")
    mistral.to_hf(model.llm, folder / "llm")
    vision = SiglipVisionModel.from_pretrained(str(folder / "siglip")).eval()
    proj = torch_projector(model.cfg.projector, folder / "projector").eval()
    llm = MistralForCausalLM.from_pretrained(str(folder / "llm")).eval()
    return vision, proj, llm


def hf_answers(assistant, hf, items, prompts, batches, max_new_tokens, text) -> list[str]:
    """LLaVA-style eager evaluation: per batch, vision -> projector -> spliced embeddings -> HF generate."""
    import torch

    from genllava_jax import infer

    vision, proj, llm = hf
    ids, cfg = assistant.ids, assistant.model.cfg
    out = [""] * len(items)
    with torch.inference_mode():
        for b in batches:
            x, mask = infer.left_pad([prompts[i] for i in b.rows], max(len(prompts[i]) for i in b.rows), ids.pad)
            pixels, has_image, _ = assistant.pixels([items[i].load_image() for i in b.rows])
            x, mask = torch.from_numpy(x).long(), torch.from_numpy(mask).long()
            embeds = llm.get_input_embeddings()(x)
            if has_image.any():
                feats = vision(torch.from_numpy(pixels[has_image]).permute(0, 3, 1, 2), output_hidden_states=True)
                patches = proj(feats.hidden_states[cfg.vision.feature_layer])
                is_img = (x == cfg.image_token_id) & torch.from_numpy(has_image)[:, None]
                embeds[is_img] = patches.reshape(-1, patches.shape[-1])  # each row's patches in order
            new = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=[ids.eos, ids.soi], pad_token_id=ids.pad).numpy()
            for r, i in enumerate(b.rows):
                stop = np.flatnonzero(np.isin(new[r], [ids.eos, ids.soi]))
                out[i] = text(new[r], stop[0] + 1 if stop.size else new.shape[1])
    return out


def torch_images(tg, assistant, items, prompts, batches, steps: int, guidance: float, seed: int = 0) -> int:
    """diffusers-based generation of the same model, batch by batch: the torch composition
    (`convert.torch_genllava.TorchGenLLaVA`) gives the [IMG] conditioning of prompt + [SOI][IMG..] (forced, as our
    timed pass), then `diffusers.DDIMScheduler` steps the `UNet2DConditionModel` with classifier-free guidance
    against the learned null conditioning and `AutoencoderKL` decodes. Returns the number of images made."""
    import torch
    from diffusers import DDIMScheduler

    from genllava_jax import infer

    ids, cfg = assistant.ids, assistant.model.cfg
    s = cfg.schedule
    sched = DDIMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                          beta_schedule=s.beta_schedule, prediction_type=s.prediction_type, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    g = torch.Generator().manual_seed(seed)
    made = 0
    with torch.inference_mode():
        for b in batches:
            rows = [prompts[i] + list(ids.generation) for i in b.rows]  # the answer forced straight to [SOI][IMG..]
            x, mask = infer.left_pad(rows, max(map(len, rows)), ids.pad)
            pixels, has_image, _ = assistant.pixels([items[i].load_image() for i in b.rows])
            x, mask = torch.from_numpy(x).long(), torch.from_numpy(mask).long()
            embeds = tg.embed_inputs(x, torch.from_numpy(pixels), torch.from_numpy(has_image))
            hidden = tg.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            pos = (x[:, None, :] == torch.tensor(cfg.img_token_ids)[None, :, None]).long().argmax(-1)
            take = lambda t: torch.gather(t, 1, pos[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
            cond = tg.head(take(hidden), take(embeds))
            both = torch.cat([tg.null_cond[None].expand_as(cond), cond])
            size = cfg.unet.sample_size
            latents = torch.randn(len(rows), tg.unet.config.in_channels, size, size, generator=g)
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                eps_u, eps_c = tg.unet(torch.cat([latents] * 2), t, encoder_hidden_states=both).sample.chunk(2)
                latents = sched.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
            tg.vae.decode(latents / cfg.vae.scaling_factor).sample.clamp(-1, 1)
            made += len(rows)
    return made


def image_row(a, assistant, world, tmp, mesh, what, load, record_fn):
    """Images/s: our sweep's generation cell (decode, then the jitted [IMG] -> Q-former -> guided DDIM -> VAE on
    full batches, PNGs written) vs diffusers-based generation of the same model, in the same run."""
    import torch

    from convert.torch_genllava import TorchGenLLaVA
    from genllava_jax import infer, sweep
    from genllava_jax.evaluate import generation, synthetic

    items = generation.read_t2i(synthetic.write_t2i(world, tmp, a.images, eval_only=False)[0])
    prompts = sweep.prompts_of(assistant, items)
    settings = infer.Settings(max_new_tokens=1, num_steps=a.steps, guidance_scale=a.guidance, force_image=True)
    runner = sweep.CellRunner(assistant, mesh, a.batch)
    t0 = time.perf_counter()
    runner.run(items, prompts, settings, tmp / "warm_t2i.jsonl", "bench", images_dir=tmp / "warm_images")
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.run(items, prompts, settings, tmp / "timed_t2i.jsonl", "bench", images_dir=tmp / "timed_images")
    ours_s = time.perf_counter() - t0
    n_ours = len(list((tmp / "timed_images").glob("*.png")))

    tg = TorchGenLLaVA.from_jax(assistant.model, tmp / "torch").eval()
    batches = sweep.plan(prompts, items, a.batch, assistant.length_buckets)
    theirs_s, threads = float("inf"), torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        torch_images(tg, assistant, items, prompts, batches[:1], a.steps, a.guidance)  # warm-up
        t0 = time.perf_counter()
        n_theirs = torch_images(tg, assistant, items, prompts, batches, a.steps, a.guidance)
        dt = time.perf_counter() - t0
        if dt < theirs_s:
            theirs_s, threads = dt, n
    c = assistant.model.cfg
    command = (f"python bench/eval.py{f' --workdir {a.workdir}' if a.workdir else ''} --images {a.images} "
               f"--batch {a.batch} --steps {a.steps} --guidance {a.guidance}")
    record_fn(
        "eval images", command,
        ["model, benchmark", "ours images/s", "diffusers images/s", "ratio (ours/diffusers)", "our compile s"],
        [f"{what} (UNet {c.unet.sample_size}² latents, VAE {c.vae.sample_size}² px), t2i synthetic, {n_ours} "
         f"images, batch {a.batch}, DDIM {a.steps} steps, guidance {a.guidance}, {len(jax_devices())} device(s), "
         f"torch {threads} thread(s)",
         f"{n_ours / ours_s:.2f}", f"{n_theirs / theirs_s:.2f}", f"{theirs_s / ours_s:.2f}×",
         f"{first_s - ours_s:.1f}"],
        note="Ours: a sweep t2i cell with force_image (a 1-token answer decoded, then [SOI][IMG..] forced), timed on a "
             "second pass (compilation excluded), PNGs written. diffusers: the same model composed in torch, the "
             "prompt forced to [SOI][IMG..] without decoding, one warm-up batch, images decoded but not saved. "
             f"The machine was shared (1-minute load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, "
             f"on {os.cpu_count()} cores).")


def jax_devices():
    import jax

    return jax.devices()


def print_row(name, command, header, row, note=""):
    print(f"{name}: {command}\n" + "\n".join(f"  {h}: {v}" for h, v in zip(header, row)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=None, help="a trained run (e.g. runs/demo/train); default: configs/tiny.py "
                   "freshly initialised on a new synthetic world")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--print_only", action="store_true", help="do not write BENCHMARKS.md (trial runs)")
    p.add_argument("--images", type=int, default=32, help="image row: t2i prompts (0: no image row)")
    p.add_argument("--steps", type=int, default=10, help="image row: DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="image row: classifier-free guidance scale")
    p.add_argument("--images_only", action="store_true", help="only the image row")
    a = p.parse_args()

    import jax
    import torch

    from genllava_jax import cli, infer, sharding, sweep
    from genllava_jax.evaluate import read_benchmark, score, synthetic

    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp())
    mesh = sharding.make_mesh({"data": -1})
    buckets = (32, 48, 64, 96, 128)
    if a.workdir:
        world = Path(json.loads((Path(a.workdir) / "config.json").read_text())["data"]["path"]).parent
        assistant = cli.load_assistant(a.workdir, mesh, buckets)[0]
        what = f"{a.workdir}"
    else:
        assistant, world = fresh_tiny(tmp, mesh, buckets)
        what = "configs/tiny.py, untrained"
    if a.images:
        image_row(a, assistant, world, tmp, mesh, what, load[0], print_row if a.print_only else record)
    if a.images_only:
        return
    items = read_benchmark("gqa", *synthetic.write_gqa(world, tmp, a.n))
    prompts = sweep.prompts_of(assistant, items)
    settings = infer.Settings(max_new_tokens=a.new)
    runner = sweep.CellRunner(assistant, mesh, a.batch)

    t0 = time.perf_counter()
    runner.run(items, prompts, settings, tmp / "warm.jsonl", "bench")  # compiles every bucket
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = runner.run(items, prompts, settings, tmp / "timed.jsonl", "bench")
    ours_s = time.perf_counter() - t0
    ours = [ours[it.key] for it in items]

    text = lambda tokens, n: assistant.text(tokens[:n])
    hf = hf_model(assistant.model, tmp / "hf")
    batches = sweep.plan(prompts, items, a.batch, assistant.length_buckets)
    hf_s, threads = float("inf"), torch.get_num_threads()
    for n in sorted({1, threads}):  # torch's OpenMP threads crawl on a shared machine: HF gets the faster count
        torch.set_num_threads(n)
        hf_answers(assistant, hf, items, prompts, batches[:1], a.new, text)  # warm-up
        t0 = time.perf_counter()
        answers = hf_answers(assistant, hf, items, prompts, batches, a.new, text)
        dt = time.perf_counter() - t0
        if dt < hf_s:
            hf_s, theirs, threads = dt, answers, n

    same = sum(x == y for x, y in zip(ours, theirs))
    acc = score("gqa", ours, items)["accuracy"], score("gqa", theirs, items)["accuracy"]
    c = assistant.model.cfg.llm
    command = (f"python bench/eval.py{f' --workdir {a.workdir}' if a.workdir else ''} --n {a.n} --batch {a.batch} "
               f"--new {a.new}")
    (print_row if a.print_only else record)(
        "eval", command,
        ["model, benchmark", "ours samples/s", "HF generate samples/s", "ratio (ours/HF)", "same answers",
         "GQA acc ours / HF", "our compile s"],
        [f"{what} (Mistral {c.num_layers}L×{c.hidden_size}), GQA-format synthetic, {a.n} q, batch {a.batch}, "
         f"≤{a.new} new tokens, {len(jax.devices())} device(s), torch {threads} thread(s)",
         f"{a.n / ours_s:.1f}", f"{a.n / hf_s:.1f}", f"{hf_s / ours_s:.2f}×", f"{same}/{a.n}",
         f"{acc[0]:.3f} / {acc[1]:.3f}", f"{first_s - ours_s:.1f}"],
        note="Ours excludes compilation (second pass over the same shapes); HF had one warm-up batch. Both include "
             f"image loading and preprocessing and text decoding. The machine was shared (1-minute load average "
             f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores).")

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
