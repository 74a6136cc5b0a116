"""FLOP counts: matmul/conv FLOPs of a traced program, the analytic count of a train step (the fit check's and the
train loop's MFU), and each device's peak.

XLA's cost analysis counts a `while` (scan) body once, whatever its trip count. `program_flops` walks the jaxpr
and counts dot_general and conv FLOPs either the same way (`scale_loops=False`) or times each scan's length, so the
difference is what XLA leaves out.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import numpy as np
from flax import nnx


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    free_rhs = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
    return 2.0 * math.prod(lhs) * math.prod(free_rhs)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_feature_dim]


def _subjaxprs(params):
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def jaxpr_flops(jaxpr, scale_loops: bool = True) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        subs = [jaxpr_flops(j, scale_loops) for j in _subjaxprs(eqn.params)]
        if name == "cond":
            total += max(subs, default=0.0)  # one branch runs
        else:
            times = eqn.params["length"] if name == "scan" and scale_loops else 1
            total += times * sum(subs)
    return total


def program_flops(fn, *args, scale_loops: bool = True) -> float:
    """Matmul + convolution FLOPs of fn(*args) (args may be abstract); while loops other than scans count once."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr, scale_loops)


def _forward_flops(module: nnx.Module, *args, call=lambda m, *a: m(*a)) -> float:
    graphdef, state = nnx.split(module)
    return program_flops(lambda s, *a: call(nnx.merge(graphdef, s), *a), state, *args)


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def analytic(model, cfg, *, rows: int, seq_len: int, target_px: int, trainable: set[str]) -> dict:
    """Train-step model FLOPs from the model's shapes (abstract `model` is fine), by part.

    A trainable part costs 3 forward passes (forward, input and weight gradients); a frozen part the gradient
    flows through (the UNet) 2; a frozen part nothing flows back into (SigLIP, the VAE encoder) 1. Transformers
    by formula: 2·N·tokens per matmul pass plus 4·L·T²·D for the dense attention scores and mixing. The Q-former
    head, UNet and VAE encoder (convolutions, cross-attention) by the matmul/conv FLOPs of their traced forward.
    Model FLOPs: what remat recomputes is not counted (the traced program's count has it). A kernel LoRA freezes
    (`genllava_jax.lora`) costs 2 passes in a trainable transformer part (no weight gradient), its factors 3; LoRA
    on the head or the UNet is counted as if those were trained whole.
    """
    from genllava_jax import lora

    B, T = rows, seq_len
    Bd = min(cfg.diffusion_rows, B) if cfg.diffusion_rows else B
    jnp_f32 = jax.numpy.float32
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp_f32)

    llm = cfg.llm
    n_llm = _size(nnx.state(model.llm, nnx.Param)) - (0 if llm.tie_embeddings else llm.vocab_size * llm.hidden_size)
    llm_fwd = 2 * n_llm * B * T + 4 * llm.num_layers * B * T * T * llm.num_heads * llm.head_dim
    v = cfg.vision
    P = cfg.num_patches
    vis_fwd = 2 * _size(nnx.state(model.vision, nnx.Param)) * B * P + 4 * v.num_layers * B * P * P * v.hidden_size
    proj_fwd = 2 * _size(nnx.state(model.projector, nnx.Param)) * B * P
    N = len(cfg.img_token_ids)
    head_fwd = _forward_flops(model.head, sds(Bd, N, llm.hidden_size), sds(Bd, N, llm.hidden_size))
    side = target_px // 2 ** (len(cfg.vae.block_out_channels) - 1)
    Bu = Bd * cfg.diffusion_repeats  # noise draws per target image
    unet_fwd = _forward_flops(model.unet, sds(Bu, side, side, cfg.unet.in_channels),
                              jax.ShapeDtypeStruct((Bu,), jax.numpy.int32),
                              sds(Bu, cfg.head.num_query_tokens, cfg.unet.cross_attention_dim))
    vae_fwd = _forward_flops(model.vae, sds(Bd, target_px, target_px, 3), call=lambda m, x: m.latents(x))
    vae_fwd *= 2 if cfg.edit_mode == "latent_concat" else 1  # the source image too

    fwd = {"llm": llm_fwd, "vision": vis_fwd, "projector": proj_fwd, "head": head_fwd, "unet": unet_fwd,
           "vae": vae_fwd}
    grads_flow_through = {"unet"}  # frozen, but the head's gradient passes through it
    out = {name: (3 if name in trainable else 2 if name in grads_flow_through else 1) * f for name, f in fwd.items()}
    for name, tokens in (("llm", B * T), ("vision", B * P), ("projector", B * P)):
        if name in trainable:  # the weight gradients LoRA's frozen kernels do not take: one pass of 3 less
            flat = nnx.to_flat_state(nnx.state(getattr(model, name), nnx.Param))
            frozen = lora.frozen_paths(getattr(model, name))
            out[name] -= 2 * tokens * sum(_size(v.get_value()) for p, v in flat if "/".join(map(str, p)) in frozen)
    return out


def train_step_flops(model, cfg, c, trainable: set[str]) -> float:
    """Model FLOPs of one optimizer step of config `c` (every micro-batch of `train.accum`), by `analytic`."""
    rows = c.train.batch_size // c.train.accum
    parts = analytic(model, cfg, rows=rows, seq_len=c.data.max_len, target_px=c.data.target_image_size,
                     trainable=trainable)
    return c.train.accum * sum(parts.values())


# Dense bfloat16 peak FLOP/s of one device, by the start of its `device_kind` or a part of it (the first match);
# a v4 / v5p chip is one (megacore) device. Vendor figures: TPU v4 275 T, v5e 197 T, v5p 459 T, v6e 918 T;
# H100 / H200 SXM 989 T (H100 PCIe: 756 T), A100 312 T.
PEAK_FLOPS = (("TPU v5 lite", 197e12), ("TPU v6 lite", 918e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
              ("TPU v4", 275e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device) -> float | None:
    """Peak FLOP/s of one device: the table above, or on CPU a float32 matmul measured now (the host's cores are
    shared by its CPU devices); None for an unknown accelerator."""
    if device.platform == "cpu":
        return _measured_cpu_flops() / len([d for d in jax.local_devices() if d.platform == "cpu"])
    return next((peak for name, peak in PEAK_FLOPS if name in device.device_kind), None)


@functools.cache
def _measured_cpu_flops(n: int = 1024, reps: int = 8) -> float:
    """FLOP/s of a jitted n×n float32 matmul on the first CPU device (best of a few runs: a busy host is slower)."""
    cpu = jax.local_devices(backend="cpu")[0]
    x = jax.device_put(np.ones((n, n), np.float32), cpu)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best
