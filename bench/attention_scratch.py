"""Attention scratch per layer and row: the temporaries XLA:TPU allocates for one attention call, forward and forward
+ backward, at the 7B model's shapes (1 row, bf16), compiled for one TPU chip on this CPU through libtpu (nothing
runs). The dense XLA attention (the reference) and each fused backend side by side, as a ratio.

    python bench/attention_scratch.py [--topology=v5p-8] [--seq=2048]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_util  # noqa: E402, F401 -- puts the checkout's root on sys.path (launch/)
from genllava_jax import attention  # noqa: E402
from launch import aot  # noqa: E402

MiB = 2 ** 20
# tower: (query heads, KV heads, head dim, causal, tokens or None for --seq)
CELLS = {"llm": (32, 8, 128, True, None),  # Mistral-7B
         "unet 64x64": (8, 8, 40, False, 64 * 64)}  # SD 1.x's first self-attention at 512 px


def backends() -> dict:
    """name -> attention(q_BTNH, k_BSKH, v_BSKH, causal): the dense reference and the TPU kernels
    (genllava_jax.attention), each called as the towers call it."""
    def make(backend):
        return lambda q, k, v, causal: attention.attention(q, k, v, attention.Mask(causal=causal), backend=backend)

    return {name: make(name) for name in ("xla", "splash", "flash")}


def scratch(fn, shapes, device, backward: bool) -> float:
    """Temporary bytes of fn's forward (or forward + gradients w.r.t. q, k, v) compiled for `device`."""
    def loss(q, k, v):
        return fn(q, k, v).astype(jnp.float32).sum()

    step = jax.grad(loss, argnums=(0, 1, 2)) if backward else loss
    sh = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh) for s in shapes]
    return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5p-8")
    p.add_argument("--seq", type=int, default=2048, help="the LLM's sequence length")
    a = p.parse_args(argv)
    device = aot.target_devices(a.topology)[0]
    print(f"attention scratch per layer and row on one {device.device_kind} chip (MiB; ratio to xla):")
    for tower, (n, kv, h, causal, tokens) in CELLS.items():
        T = tokens or a.seq
        shapes = [(1, T, n, h), (1, T, kv, h), (1, T, kv, h)]
        ref = None
        for name, fn in backends().items():
            f = lambda q, k, v: fn(q, k, v, causal)  # noqa: E731
            fwd, bwd = (scratch(f, shapes, device, b) for b in (False, True))
            ref = ref or (fwd, bwd)
            print(f"  {tower:<11} T={T:<5} {n}/{kv} heads x {h} {'causal' if causal else 'full':<6} {name:<8} "
                  f"forward {fwd / MiB:8.1f} ({fwd / ref[0]:.3f}x)   forward+backward {bwd / MiB:8.1f} "
                  f"({bwd / ref[1]:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
