"""The joint train step: ours (one jitted step) vs the same architecture composed in torch, in one run.

    .venv/bin/python bench/train_step.py [--steps 10] [--batch 32] [--print_only]

Model: configs/tiny.py (the demo's model: every part but the VAE trains), on a fresh synthetic world; the same
`--steps` + 1 batches from our data pipeline feed both sides.
Ours: `train.jit_train_step` (CE + λ·Min-SNR MSE, AdamW + warm-up/cosine, global-norm clipping, donated state) on
all local devices; the first step (compilation) is reported apart.
Torch: `convert.torch_genllava.TorchGenLLaVA` — SiglipVisionModel, Linear·GELU·Linear, MistralForCausalLM,
Blip2QFormerModel + linears, UNet2DConditionModel, AutoencoderKL and DDPMScheduler loaded with our initial weights —
with torch.optim.AdamW at our schedule's learning rate per step and clip_grad_norm_; the VAE frozen as ours. It gets
our step's random draws (noise, timesteps, guidance drop), so both sides start from the same loss (checked) and
follow nearby trajectories. Timed with 1 thread and with torch's default count, the faster kept.
FLOPs per step: the matmul + convolution FLOPs of our traced train step (forward, backward, remat), the same work
for both sides; achieved GFLOP/s against this machine's float32 matmul peak measured in the same run (the faster of
XLA's and torch's 2048² matmul).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_util import record, tiny_config


def matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
    """Float32 matmul GFLOP/s of this machine in XLA and in torch (best of `reps`)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = {}
    for name, run in (("xla", lambda: f(a).block_until_ready()),
                      ("torch", lambda t=torch.from_numpy(np.array(a)): t @ t)):
        run()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        best[name] = 2 * n ** 3 / min(times) / 1e9
    return best


def torch_trainer(ref, c, schedule):
    """(step fn(i, batch, draws) -> loss, params) for the torch model with our optimizer settings."""
    import torch

    tc = c.train
    trainable = {p.split("/")[0].removesuffix(".*") for p in tc.trainable}
    params = []
    for name, module in (("vision", ref.vision), ("projector", ref.projector), ("llm", ref.llm), ("head", ref.head),
                         ("unet", ref.unet), ("vae", ref.vae)):
        module.requires_grad_(name in trainable)
        params += [p for p in module.parameters() if name in trainable]
    ref.null_cond.requires_grad_("null_cond" in trainable)
    params += [ref.null_cond] if "null_cond" in trainable else []
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.b1, tc.b2), eps=1e-8, weight_decay=tc.weight_decay)

    def step(i, batch, draws):
        for g in opt.param_groups:
            g["lr"] = float(schedule(i))
        opt.zero_grad(set_to_none=True)
        loss, _ = ref.loss(batch, draws)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        return loss.item()

    return step, params


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (after one warm-up step)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--print_only", action="store_true", help="do not write BENCHMARKS.md (trial runs)")
    a = p.parse_args()

    import jax
    import torch

    from convert.torch_genllava import TorchGenLLaVA, draws_of
    from genllava_jax import sharding, train
    from genllava_jax.data.pipeline import make_dataset
    from genllava_jax.flops import program_flops

    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp())
    c = tiny_config(tmp / "world", num_train=max(256, a.batch * (a.steps + 1)), num_eval=8)
    c.train.batch_size = a.batch
    c.train.lr_scales = ()  # torch_trainer has one learning rate for all: the same optimizer on both sides
    mesh = sharding.make_mesh({"data": -1})
    cfg, model, tokenizer, mesh = train.build(c, mesh)
    ref = TorchGenLLaVA.from_jax(model, tmp / "torch")  # the same initial weights
    state, s = train.setup(model, c.train, mesh, c.seed)
    del model
    it, _ = make_dataset(c.data, tokenizer, global_batch=a.batch, seed=c.seed)
    batches = [{k: v for k, v in next(it).items() if not k.startswith("_")} for _ in range(a.steps + 1)]
    draws = [draws_of(cfg, jax.random.fold_in(jax.random.PRNGKey(c.seed), i), a.batch) for i in range(a.steps + 1)]

    fn = lambda st, fr, b: train.train_step(st, fr, b, graphdef=s.graphdef, rest=s.rest, tx=s.tx,
                                            schedule=s.schedule, grad_clip=s.grad_clip)
    flops = program_flops(fn, state, s.frozen, train.to_global(batches[0], s))

    step = train.jit_train_step(s)
    ours_losses = []
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, m = step(state, s.frozen, train.to_global(batches[0], s))
        ours_losses.append(float(m["loss"]))
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches[1:]:
            state, m = step(state, s.frozen, train.to_global(b, s))
            ours_losses.append(m["loss"])
        jax.block_until_ready(state)
        ours_s = (time.perf_counter() - t0) / a.steps
    ours_losses = [float(x) for x in ours_losses]
    del state

    torch_step, _ = torch_trainer(ref, c, s.schedule)
    torch_losses = [torch_step(0, batches[0], draws[0])]  # warm-up: the same first step as ours
    theirs_s, threads, default_threads = float("inf"), None, torch.get_num_threads()
    for n in sorted({1, default_threads}):  # torch's OpenMP threads crawl on a shared machine: the faster count
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        losses = [torch_step(i, b, d) for i, (b, d) in enumerate(zip(batches[1:], draws[1:]), start=1)]
        dt = (time.perf_counter() - t0) / a.steps
        if dt < theirs_s:
            theirs_s, threads = dt, n
        torch_losses += losses if len(torch_losses) == 1 else []
    torch.set_num_threads(default_threads)
    peak = matmul_peak()
    best_peak = max(peak.values())

    command = f"python bench/train_step.py --steps {a.steps} --batch {a.batch}"
    llm = cfg.llm
    header = ["model, batch", "ours s/step", "torch s/step", "ratio (torch/ours)", "first loss ours / torch",
              f"loss after {a.steps + 1} steps ours / torch", "GFLOP/step", "achieved GFLOP/s ours / torch",
              "fraction of matmul peak ours / torch", "our compile s"]
    row = [f"configs/tiny.py (SigLIP {cfg.vision.num_layers}L×{cfg.vision.hidden_size}, Mistral "
           f"{llm.num_layers}L×{llm.hidden_size}, Q-former {cfg.head.num_layers}L, UNet {cfg.unet.block_out_channels}, "
           f"diffusion rows {cfg.diffusion_rows}×{cfg.diffusion_repeats}), batch {a.batch} × {c.data.max_len} "
           f"tokens, {len(jax.devices())} device(s), torch {threads} thread(s)",
           f"{ours_s:.3f}", f"{theirs_s:.3f}", f"{theirs_s / ours_s:.2f}×",
           f"{ours_losses[0]:.5f} / {torch_losses[0]:.5f}", f"{ours_losses[-1]:.4f} / {torch_losses[-1]:.4f}",
           f"{flops / 1e9:.2f}", f"{flops / ours_s / 1e9:.1f} / {flops / theirs_s / 1e9:.1f}",
           f"{flops / ours_s / 1e9 / best_peak:.1%} / {flops / theirs_s / 1e9 / best_peak:.1%}",
           f"{first_s - ours_s:.1f}"]
    note = (f"Matmul peak measured in the same run (float32 2048², best of 10): XLA {peak['xla']:.0f}, torch "
            f"{peak['torch']:.0f} GFLOP/s; the fraction is of the faster. Both sides do the same work per step "
            "(the FLOPs are our traced step's matmuls and convolutions, forward + backward). Step times exclude "
            "the first step (compilation for ours, warm-up for torch). The machine's 1-minute load average was "
            f"{load[0]:.1f} before and {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores.")
    if a.print_only:
        print(f"{command}\n" + "\n".join(f"  {h}: {v}" for h, v in zip(header, row)) + f"\n{note}")
    else:
        record("train step", command, header, row, note)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
