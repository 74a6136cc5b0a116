"""The data makers' throughput: `llava` records/s (ours: the maker on its ChatLLM, jitted and batched, vs the same
maker on `transformers` `generate`) and the `stablellava` renderer's images/s (ours: `SDRenderer` through
genllava_jax.sd, vs diffusers' StableDiffusionPipeline).

    .venv/bin/python bench/datagen.py            # prints two Markdown tables and stores them in BENCHMARKS.md

llava: a small random MistralForCausalLM (4 layers × 256, from torch.manual_seed(0)) saved as a Hugging Face folder
with a BPE tokenizer trained on the shipped prompt files and the synthetic world's captions (so the prompts tokenise
to about as many tokens as words), loaded by `datagen.llm.load` as `--llm=FOLDER` does (converted in memory). The
input is the synthetic world written as COCO (`datagen.world.write_coco`), the prompts are the shipped
configs/datagen/llava files (system message + in-context examples + the image's context) with max_new_tokens
lowered to --new. Both sides run `llava.make` (prompt building, parsing, filtering, writing) on the same requests:
ours decodes with ChatLLM (left-padded length buckets, one compile per bucket), the reference groups the same rows
into the same batches, left-pads them to the batch's longest prompt and calls `generate`; greedy, the same
</s>. A random LLM rarely emits </s>: nearly every reply runs to --new tokens and is filtered as unfinished, which
is the throughput we want (fixed work per record). Our compile time (the first run less a timed run) is apart; both
sides get one warm-up run, then the runs alternate; the ratio is the median of the pairs' ratios (a change in
the machine's load hits a pair alike).

stablellava: the tests' tiny random SD (tests/micro.py `tiny_sd_pipeline`, 16 px), loaded by `sd.load` as
`--sd=FOLDER` does; the maker's renderer draws each record's noise from its id and renders full batches; diffusers
gets the same prompts and the same initial latents, DDIM, the same steps and guidance.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MistralConfig, MistralForCausalLM

from bench_util import ROOT, record
from genllava_jax import infer, sd
from genllava_jax.data import synthetic
from genllava_jax.data.tokenizer import load_tokenizer, train_tokenizer
from genllava_jax.datagen import coco, llava, llm, output, prompts, stablellava as sl, world
from genllava_jax.datagen.llm import Completion

sys.path.insert(0, str(ROOT / "tests"))
from micro import tiny_sd_pipeline  # noqa: E402  (the tests' tiny SD: one recipe for both)

LLM = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
           head_dim=32, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)


class Recorded:
    """A chat (ours or the reference) whose completions are kept by request key, to compare the two."""

    def __init__(self, chat):
        self.chat, self.batch_size, self.seen = chat, chat.batch_size, {}

    def complete(self, requests, on_batch=None):
        out = self.chat.complete(requests, on_batch=on_batch)
        self.seen.update({r.key: (c.text, c.num_tokens) for r, c in zip(requests, out)})
        return out


class HFChat:
    """The reference decoder: ChatLLM's prompts and batches, `generate` instead of our jitted decode."""

    def __init__(self, hf: MistralForCausalLM, ours: llm.ChatLLM):
        self.hf, self.ours, self.batch_size = hf, ours, ours.batch_size

    def complete(self, requests, on_batch=None):
        ids, prompts_ = self.ours.ids, [self.ours.encode(r) for r in requests]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (r, p) in enumerate(zip(requests, prompts_)):  # ChatLLM's grouping, so the same rows share a batch
            groups.setdefault((infer.bucket(len(p), self.ours.length_buckets), r.max_new_tokens), []).append(i)
        out = [None] * len(requests)
        for (_, new), rows in sorted(groups.items()):
            for s in range(0, len(rows), self.batch_size):
                batch = rows[s:s + self.batch_size]
                x, mask = infer.left_pad([prompts_[i] for i in batch], max(len(prompts_[i]) for i in batch), ids.pad)
                with torch.no_grad():
                    gen = self.hf.generate(input_ids=torch.tensor(x, dtype=torch.long),
                                           attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=new,
                                           do_sample=False, eos_token_id=ids.eos, pad_token_id=ids.pad)
                gen = gen[:, x.shape[1]:].numpy()
                for b, i in enumerate(batch):
                    toks = [int(t) for t in gen[b]]
                    toks = toks[:toks.index(ids.eos) + 1] if ids.eos in toks else toks
                    out[i] = Completion(self.ours.text(toks), bool(toks) and toks[-1] == ids.eos, len(toks))
                if on_batch is not None:
                    on_batch(len(batch))
        return out


def build_llm(folder: Path) -> MistralForCausalLM:
    texts = [f.read_text() for f in sorted((prompts.default_dir() / "llava").glob("*.toml"))]
    texts += [s.full_caption for s in synthetic.ALL_SCENES]
    train_tokenizer(texts, folder, num_img_tokens=4, vocab_size=4096)
    tok = load_tokenizer(folder, 4)
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                          **LLM)).eval()
    hf.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return hf


def timed(fn):
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def bench_llava(a, tmp: Path) -> None:
    hf = build_llm(tmp / "llm")
    chat, _ = llm.load(tmp / "llm", mesh=llm.local_mesh("data=-1"), batch_size=a.batch, temperature=0.0, top_p=1.0)
    captions, instances, images = world.write_coco(tmp / "coco", synthetic.ALL_SCENES[:a.images], 32)
    entries = coco.read(captions, instances)
    ps = {f.stem: dataclasses.replace(prompts.load(f, {"context"}), max_new_tokens=a.new)
          for f in sorted((prompts.default_dir() / "llava").glob("*.toml"))}
    lengths = [len(chat.encode(p.request("x", context=coco.context(e)))) for p in ps.values() for e in entries]
    ours, ref = Recorded(chat), Recorded(HFChat(hf, chat))
    runs = iter(range(10**6))

    def run(maker_chat):
        out = output.Output(tmp / "out" / f"{next(runs)}" / "llava.jsonl", {})
        report = llava.make(entries, images, maker_chat, ps, out, progress=False)
        out.close()
        return report

    report, first_s = timed(lambda: run(ours))
    run(ref)
    times = {"ours": [], "transformers": []}
    for _ in range(a.repeats):  # interleaved, so that a change in the machine's load hits both sides alike
        times["ours"].append(timed(lambda: run(ours))[1])
        times["transformers"].append(timed(lambda: run(ref))[1])
    ours_s, ref_s = (float(np.median(times[k])) for k in ("ours", "transformers"))
    pairs = [round(r / o, 2) for o, r in zip(times["ours"], times["transformers"])]
    n = report["total"]
    same = sum(ours.seen[k] == ref.seen[k] for k in ours.seen)
    unfinished = report["filtered"].get("unfinished", 0)
    times = {k: [round(t, 1) for t in v] for k, v in times.items()}
    print(times)
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    record("datagen llava", f"python bench/datagen.py --batch {a.batch} --images {a.images} --new {a.new} "
                            f"--repeats {a.repeats}",
           ["config", "ours records/s", "transformers generate records/s", "ratio (ours/transformers)",
            "greedy replies identical", "our compile s"],
           [f"random Mistral {LLM['num_hidden_layers']}L×{LLM['hidden_size']} ({params:.1f}M params, vocab "
            f"{hf.config.vocab_size}), {n} records ({a.images} COCO images × {len(ps)} shipped prompt files, "
            f"prompts {min(lengths)}-{max(lengths)} tokens), batch {a.batch}, ≤{a.new} new tokens, greedy",
            f"{n / ours_s:.3g}", f"{n / ref_s:.3g}", f"{np.median(pairs):.2f}×", f"{same}/{len(ours.seen)}",
            f"{first_s - ours_s:.1f}"],
           note=f"Both sides run the `llava` maker end to end (prompts, parsing, filters, writing); {unfinished} of "
                f"{n} replies ran to the token limit (filtered as unfinished: a random LLM). Ours pads each batch "
                f"to its length bucket ({sorted(chat.shapes)} (bucket, new tokens) compiled), the reference to the "
                f"batch's longest prompt. Seconds per run (alternating): {times}, each pair's ratio {pairs} "
                f"(the table: their median; records/s: each side's median run); float32 on this CPU, torch "
                f"{torch.get_num_threads()} thread(s); 1-minute load average {os.getloadavg()[0]:.1f} at the end "
                f"on {os.cpu_count()} cores. Compile: the first run less the median run.")


def bench_stablellava(a, tmp: Path) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    pipe_hf, folder = tiny_sd_pipeline(tmp)
    ours = sd.load(folder, llm.local_mesh("data=-1"))
    render = sl.SDRenderer(ours, batch_size=a.batch, num_steps=a.steps, guidance_scale=7.5, seed=0)
    words = ("a", "b", "c")
    prompts_ = [" ".join(words[(i + j) % 3] for j in range(1 + i % 3)) for i in range(a.renders)]
    keys = [f"sl-{i}" for i in range(a.renders)]
    latents = sl._noise(0, keys, render.latent_shape)  # what the renderer draws for these records
    size = ours.default_size

    def run_diffusers():
        images = []
        for s in range(0, a.renders, a.batch):
            with torch.no_grad():
                images += list(pipe_hf(prompt=prompts_[s:s + a.batch], height=size, width=size,
                                       latents=torch.tensor(latents[s:s + a.batch].transpose(0, 3, 1, 2)),
                                       num_inference_steps=a.steps, guidance_scale=7.5, output_type="np").images)
        return np.stack(images)

    _, first_s = timed(lambda: render(prompts_, keys))
    run_diffusers()
    times = {"ours": [], "diffusers": []}
    for _ in range(a.repeats):
        out, t = timed(lambda: render(prompts_, keys))
        times["ours"].append(t)
        ref, t = timed(run_diffusers)
        times["diffusers"].append(t)
    ours_s, ref_s = (float(np.median(times[k])) for k in ("ours", "diffusers"))
    pairs = [round(r / o, 2) for o, r in zip(times["ours"], times["diffusers"])]
    diff = float(np.abs(np.stack(out).astype(np.float32) - np.round(ref * 255)).max())
    times = {k: [round(t, 2) for t in v] for k, v in times.items()}
    print(times)
    params = sum(p.numel() for m in (pipe_hf.unet, pipe_hf.vae, pipe_hf.text_encoder) for p in m.parameters()) / 1e6
    record("datagen stablellava render", f"python bench/datagen.py --batch {a.batch} --renders {a.renders} "
                                         f"--steps {a.steps} --repeats {a.repeats}",
           ["config", "ours images/s", "diffusers images/s", "ratio (ours/diffusers)", "max |Δ| pixels (0-255)",
            "our compile s"],
           [f"the tests' tiny random SD ({params:.2f}M params), {size}×{size} images, {a.renders} records, batch "
            f"{a.batch}, DDIM {a.steps} steps + CFG 7.5", f"{a.renders / ours_s:.3g}", f"{a.renders / ref_s:.3g}",
            f"{np.median(pairs):.2f}×", f"{diff:.0f}", f"{first_s - ours_s:.1f}"],
           note=f"The maker's render step only (`SDRenderer`: each record's noise from its id, full batches, uint8 "
                f"out) vs the diffusers pipeline on the same prompts and latents (its [0, 1] floats rounded to "
                f"0-255). At this size the step is dominated by per-call overhead, not by the UNet: bench/sd.py "
                f"has the pipelines at 64 px. Seconds per run (alternating): {times}, each pair's ratio {pairs} (the "
                f"table: their median); torch {torch.get_num_threads()} thread(s); 1-minute load average "
                f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores.")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=16, help="llava: COCO images (each asked with every prompt file)")
    p.add_argument("--new", type=int, default=128, help="llava: max new tokens per reply")
    p.add_argument("--renders", type=int, default=16, help="stablellava: images rendered")
    p.add_argument("--steps", type=int, default=25, help="stablellava: DDIM steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", choices=("llava", "stablellava"), default=None)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if a.only != "stablellava":
        bench_llava(a, tmp)
    if a.only != "llava":
        bench_stablellava(a, tmp / "sd")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
