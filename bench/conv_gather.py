"""Simulated time of the diffusion towers' convolutions on a TPU with the kernels gathered whole before each
convolution (`layers.Conv.gather_kernel`, the default) against leaving XLA to partition them as they are sharded
(fsdp on the output channels: XLA:TPU runs a windowed all-gather loop of narrow convolutions). Per chip, 1 image per
chip, fsdp over every chip, the 7B config's towers (SD v1.4 at 512 px, bfloat16): the frozen VAE encoder's latents
(forward) and the UNet's gradient (full remat). Compiled on this CPU through libtpu (nothing runs), simulated from
libtpu's cost model (launch/simulate.py): an estimate, not a measurement.

    python bench/conv_gather.py [--topology=v5e-16] [--rows=1] [--towers=vae,unet]

prints a line per tower and setting: `TOWER, kernels gathered|as sharded: S ms a step (ratio to as sharded R);
temporaries M GiB a chip; compile C s`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import bench_util  # noqa: E402, F401 -- puts the checkout's root on sys.path (configs/, launch/)
from configs import genllava_7b  # noqa: E402
from genllava_jax import layers, sharding as shd, train  # noqa: E402
from genllava_jax.models.unet import UNet  # noqa: E402
from genllava_jax.models.vae import AutoencoderKL  # noqa: E402
from launch import aot  # noqa: E402
from launch import simulate as sim  # noqa: E402


def programs(rows: int, chips: int):
    """tower -> (module constructor, function of (module, inputs), input shapes): as the joint step calls them."""
    c = genllava_7b.get_config()
    cfg = train.model_config(c, aot.tokenizer_for(c))  # the towers' configs as the joint step builds them
    vae_cfg, unet_cfg = cfg.vae, cfg.unet
    B, px, lat = rows * chips, c.data.target_image_size, unet_cfg.sample_size

    def vae(model, x):
        with jax.named_scope("vae"):  # the joint step's scope: launch/simulate.py attributes by it
            return model.latents(x)

    def unet(model, x, t, ctx):
        graphdef, params = nnx.split(model)

        def loss(p):
            with jax.named_scope("unet"):
                return nnx.merge(graphdef, p)(x, t, ctx).astype(jnp.float32).mean()
        return jax.grad(loss)(params)

    return {"vae": (lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), vae, [(B, px, px, 3)]),
            "unet": (lambda: UNet(unet_cfg, rngs=nnx.Rngs(0)), unet,
                     [(B, lat, lat, unet_cfg.in_channels), (B,), (B, 77, unet_cfg.cross_attention_dim)])}


def cell(topology: str, rows: int, tower: str, gather: bool) -> dict:
    devices = aot.target_devices(topology)
    mesh = aot.build_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    ctor, fn, shapes = programs(rows, len(devices))[tower]
    model = nnx.eval_shape(ctor)
    graphdef, params = nnx.split(model)
    params = shd.with_shardings(params, shd.state_shardings(params, mesh))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    args = [jax.ShapeDtypeStruct(s, jnp.int32 if len(s) == 1 else jnp.bfloat16, sharding=batch) for s in shapes]
    layers.Conv.gather_kernel = gather
    try:
        with jax.set_mesh(mesh):
            t = time.perf_counter()
            compiled = jax.jit(lambda p, *a: fn(nnx.merge(graphdef, p), *a)).lower(params, *args).compile()
            compile_s = time.perf_counter() - t
    finally:
        layers.Conv.gather_kernel = True
    chip = sim.CHIPS[devices[0].device_kind]
    res = sim.simulate(compiled.as_text(), chip)
    cost = res["parts"][tower]
    return {"s": cost.cycles / chip.clock_hz + cost.pallas_s, "compile_s": compile_s,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2 ** 30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e-16")
    p.add_argument("--rows", type=int, default=1, help="images per chip")
    p.add_argument("--towers", default="vae", help="vae and/or unet (the UNet's 16-chip gradient compiles for 30+ min)")
    a = p.parse_args(argv)
    print(f"SD towers on {a.topology}, {a.rows} image(s) per chip, fsdp over every chip (simulated, libtpu's cost "
          f"model):", flush=True)
    for tower in a.towers.split(","):
        ref = None
        for gather in (False, True):
            r = cell(a.topology, a.rows, tower, gather)
            ref = ref or r["s"]
            print(f"{tower}, kernels {'gathered' if gather else 'as sharded'}: {r['s'] * 1e3:.2f} ms a step (ratio "
                  f"to as sharded {r['s'] / ref:.3f}); temporaries {r['temp_gib']:.2f} GiB a chip; compile "
                  f"{r['compile_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
