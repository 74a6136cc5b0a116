"""Conversion at real sizes: host memory and time of `python -m convert` in and out, against transformers'/diffusers'
own load + save of the same folder in the same run.

    flock /tmp/heavy.lock .venv/bin/python bench/convert.py     # ~15 GB of disk under --work, ~15 min on 2 cores

Random models at the sizes users bring: SD v1.4's UNet (860M parameters, float32, one file) and a 1.1B
Mistral-architecture LLM (TinyLlama's shape, bfloat16, sharded at 1 GB), made once with the torch classes and
`save_pretrained` (kept in --work). Each conversion runs in its own process; its peak RSS (`os.wait4`) minus the
peak of a process that only imports the same modules is what converting costs, reported as a fraction
of the model's stored size (aim: <= 25 %). The export must equal the source bit for bit, tensor by tensor, and
reload with no missing or unexpected keys; that reload (`from_pretrained`, then `save_pretrained` to another folder)
is the reference row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_util import ROOT, record

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
LLM = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False)
QUICK = {"unet": dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=2, norm_num_groups=8),
         "mistral": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)}

MAKE = """
import sys, torch
kind, out, cfg = sys.argv[1], sys.argv[2], eval(sys.argv[3])
torch.manual_seed(0)
if kind == "unet":
    from diffusers import UNet2DConditionModel
    UNet2DConditionModel(**cfg).save_pretrained(out)  # float32, one file, as SD v1.4's unet/
else:
    from transformers import MistralConfig, MistralForCausalLM
    torch.set_default_dtype(torch.bfloat16)
    MistralForCausalLM(MistralConfig(**cfg)).save_pretrained(out, max_shard_size="1GB")
"""

BASELINE = """
import sys, importlib
import convert.stream
importlib.import_module("convert." + sys.argv[1])
"""

RELOAD = """
import json, sys
kind, src, out = sys.argv[1:]
if kind == "unet":
    from diffusers import UNet2DConditionModel as cls
else:
    from transformers import MistralForCausalLM as cls
model, info = cls.from_pretrained(src, output_loading_info=True)
model.save_pretrained(out)
print(json.dumps({k: len(v) for k, v in info.items()}))
"""


def run_measured(args) -> tuple[float, float, str]:
    """As `run`, with the child's own peak RSS (ru_maxrss of this one child, via os.wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # reaps it: Popen.wait would lose the rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / 2**30, out


def stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def same_tensors(a: Path, b: Path, prefix: str) -> tuple[bool, int]:
    """Whether every tensor of folder `a` equals (bytes, dtype, shape) the one of the same key in `b`; count."""
    import torch
    from safetensors import safe_open

    def index(folder):
        idx = folder / f"{prefix}.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(folder / f"{prefix}.safetensors"), "numpy") as f:
            return {k: folder / f"{prefix}.safetensors" for k in f.keys()}

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False, len(ia)
    for key in ia:
        with safe_open(str(ia[key]), "pt") as fa, safe_open(str(ib[key]), "pt") as fb:
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            bits = lambda t: t.reshape(-1).view(torch.uint8)
            if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(bits(ta), bits(tb)):
                return False, len(ia)
    return True, len(ia)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/genllava_bench_convert", help="models and outputs (~15 GB)")
    p.add_argument("--models", default="unet,mistral")
    p.add_argument("--quick", action="store_true", help="tiny models: checks the script, not the memory claim")
    p.add_argument("--same", nargs=3, metavar=("SRC", "BACK", "PREFIX"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.same:  # in a child: torch and the tensors read would raise this process's RSS, and with it every later
        # child's ru_maxrss (Linux counts the parent's resident pages at the fork in the child's peak)
        print(json.dumps(same_tensors(Path(a.same[0]), Path(a.same[1]), a.same[2])))
        return
    work = Path(a.work)
    py = sys.executable
    rows = []
    for kind in a.models.split(","):
        cfg = {**(UNET if kind == "unet" else LLM), **(QUICK[kind] if a.quick else {})}
        src = work / f"{kind}{'-quick' if a.quick else ''}"
        if not (src / "config.json").exists():
            print(f"making a random {kind} at {src} ...", flush=True)
            run_measured([py, "-c", MAKE, kind, str(src), repr(cfg)])
        size = stored_bytes(src)
        prefix = "diffusion_pytorch_model" if kind == "unet" else "model"
        ours, back, ref = work / f"{kind}-ours", work / f"{kind}-back", work / f"{kind}-reference"
        for d in (ours, back, ref):
            shutil.rmtree(d, ignore_errors=True)
        _, base, _ = run_measured([py, "-c", BASELINE, kind])
        t_in, rss_in, _ = run_measured([py, "-m", "convert", kind, "--from-hf", str(src), "--out", str(ours)])
        t_out, rss_out, _ = run_measured([py, "-m", "convert", kind, "--to-hf", str(ours), "--out", str(back),
                                          "--max-shard-size", "1"])
        _, _, same = run_measured([py, __file__, "--same", str(src), str(back), prefix])
        exact, n = json.loads(same.strip().splitlines()[-1])
        t_ref, rss_ref, info = run_measured([py, "-c", RELOAD, kind, str(back), str(ref)])
        info = json.loads(info.strip().splitlines()[-1])
        reload_ok = not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        dtype = json.loads((ours / "config.json").read_text())["config"]["param_dtype"]
        name = (f"SD v1.4 UNet ({dtype}, 1 file)" if kind == "unet" else
                f"Mistral-arch {cfg['num_hidden_layers']}L×{cfg['hidden_size']} ({dtype}, sharded at 1 GB)")
        gib = size / 2**30
        print(f"{name}: {gib:.2f} GiB stored, baseline {base:.2f} GiB; import {t_in:.0f} s peak {rss_in:.2f} GiB; "
              f"export {t_out:.0f} s peak {rss_out:.2f} GiB; reference {t_ref:.0f} s peak {rss_ref:.2f} GiB; "
              f"{n} tensors bit-exact {exact}; reload {info}", flush=True)
        frac = lambda rss: f"{(rss - base) / gib * 100:.1f} %"
        for direction, t, rss in (("import (HF → ours)", t_in, rss_in), ("export (ours → HF)", t_out, rss_out),
                                  ("reference: from_pretrained + save_pretrained", t_ref, rss_ref)):
            rows.append([name if direction.startswith("import") else "", f"{gib:.2f}", direction, f"{t:.0f}",
                         f"{rss:.2f}", f"{rss - base:.2f}", frac(rss),
                         f"{t / t_ref:.2f}× / {(rss - base) / max(rss_ref - base, 1e-9):.2f}×"
                         if not direction.startswith("reference") else "1× / 1×",
                         (f"{n} tensors {'bit-exact' if exact else 'DIFFER'}; reload: "
                          f"{'no missing/unexpected keys' if reload_ok else info}")
                         if direction.startswith("export") else ""])
        rows.append(["", "", "baseline (the same imports, no conversion)", "", f"{base:.2f}", "", "", "", ""])
        if not a.quick:
            for d in (ours, back, ref):
                shutil.rmtree(d, ignore_errors=True)
    if a.quick:
        return
    record("convert", "flock /tmp/heavy.lock python bench/convert.py",
           ["model", "stored GiB", "step", "wall s", "peak RSS GiB", "over baseline GiB",
            "over baseline / stored", "ratio to reference (time / memory over baseline)", "check"], rows,
           note=NOTE)


NOTE = ("Peak RSS is each process's own (`os.wait4` ru_maxrss); the baseline process imports the same modules. "
        "The reference loads the exported folder with transformers/diffusers (`from_pretrained`, which "
        "must report no missing, unexpected or mismatched keys) and saves it again (`save_pretrained`). "
        "The comparison runs in its own process: a child's ru_maxrss counts the parent's resident pages at the fork, "
        "so the parent stays small.")


if __name__ == "__main__":
    main()
