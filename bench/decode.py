"""Decode throughput: our jitted prefill + cached decode loop vs HF `generate` on the same small Mistral.

    .venv/bin/python bench/decode.py            # prints a Markdown row and appends it to BENCHMARKS.md

Same weights (converted), same prompts, greedy, same number of new tokens; compile time is excluded for JAX
(measured separately) and HF gets one warm-up call too. Both run on this CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import MistralConfig as HFConfig, MistralForCausalLM

from bench_util import record
from convert import mistral as conv
from genllava_jax.models.mistral import generate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    cfg = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, head_dim=32, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    hf = MistralForCausalLM(HFConfig(**cfg)).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    ours = conv.from_hf(path)
    prompt = np.random.RandomState(0).randint(1, cfg["vocab_size"], (a.batch, a.prompt))

    t0 = time.perf_counter()
    jax.block_until_ready(generate(ours, prompt, max_new_tokens=a.new))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        out = jax.block_until_ready(generate(ours, prompt, max_new_tokens=a.new))
    jax_s = (time.perf_counter() - t0) / a.repeats

    kw = dict(max_new_tokens=a.new, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(torch.tensor(prompt), **kw)
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            ref = hf.generate(torch.tensor(prompt), **kw)
        hf_s = (time.perf_counter() - t0) / a.repeats
    same = bool((np.asarray(out) == ref[:, a.prompt:].numpy()).all())
    tokens = a.batch * a.new
    record("decode", f"python bench/decode.py --batch {a.batch} --prompt {a.prompt} --new {a.new}",
           ["config", "ours tok/s", "HF generate tok/s", "ratio (ours/HF)", "same tokens", "our compile s"],
           [f"Mistral {cfg['num_hidden_layers']}L×{cfg['hidden_size']}, batch {a.batch}, prompt {a.prompt}",
            f"{tokens / jax_s:.0f}", f"{tokens / hf_s:.0f}", f"{hf_s / jax_s:.2f}×", str(same), f"{compile_s:.1f}"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
