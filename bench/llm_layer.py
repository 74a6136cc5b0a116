"""Simulated time of one Mistral-7B layer (forward + backward, one row) on a TPU, for remat policies and attention
backends side by side: the LLM tower alone (2 scanned layers, run as 32 by launch/simulate.py's reduced-depth
extrapolation) with the joint step's shardings, compiled on this CPU through libtpu (nothing runs) and simulated
from libtpu's cost model (an estimate, not a measurement). A minute or two a cell instead of the joint step's
15-30 min compile: what to try before `launch.aot --simulate`.

    python bench/llm_layer.py [--topology=v5p-8] [--rows=8] [--seq=2048] [--remat="full;save_all_names"]
        [--attention=splash,xla] [--pallas_efficiency=0.5]

prints a line per cell: `remat R, attention A: L ms a layer and row (F + B in its layer loops; ratio to the first
X); the 2-layer program's temporaries M GiB a chip; compile C s`.
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
from genllava_jax import sharding as shd  # noqa: E402
from genllava_jax.models.mistral import Mistral, MistralConfig  # noqa: E402
from launch import aot  # noqa: E402
from launch import simulate as sim  # noqa: E402

COMPILED_LAYERS = 2  # XLA inlines a one-trip loop: two is the fewest that stay a loop


def cell(topology: str, rows: int, seq: int, remat: str, backend: str, efficiency: float) -> dict:
    """Compile the 7B LLM's gradient (2 layers) for `topology` (fsdp over every chip) and simulate it."""
    llm = dict(genllava_7b.get_config().model.llm)
    full_depth = llm["num_layers"]
    cfg = MistralConfig(**{**llm, "num_layers": COMPILED_LAYERS, "remat": remat, "attention": backend})
    devices = aot.target_devices(topology)
    mesh = aot.build_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    model = nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    params = shd.with_shardings(params, shd.state_shardings(params, mesh))
    with jax.set_mesh(mesh):
        B = rows * len(devices)
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
        x = jax.ShapeDtypeStruct((B, seq, cfg.hidden_size), jnp.bfloat16, sharding=batch)
        valid = jax.ShapeDtypeStruct((B, seq), jnp.bool_, sharding=batch)

        def grads(params, x, valid):
            def loss(p):
                with jax.named_scope("llm"):  # the joint step's scope: launch/simulate.py attributes by it
                    h, _ = nnx.merge(graphdef, p).hidden(inputs_embeds=x, attention_mask=valid)
                return h.astype(jnp.float32).mean()
            return jax.grad(loss)(params)

        t = time.perf_counter()
        compiled = jax.jit(grads).lower(params, x, valid).compile()
        compile_s = time.perf_counter() - t
        text, temp = compiled.as_text(), compiled.memory_analysis().temp_size_in_bytes
    chip = sim.CHIPS[devices[0].device_kind]
    res = sim.simulate(text, chip, pallas_efficiency=efficiency, layer_loops={"llm": (COMPILED_LAYERS, full_depth)})
    loops = [x for x in res["loops"] if x["part"] == "llm" and not x["nested"]]
    per_row = [x["per_trip_s"] / rows for x in loops]  # forward loop first, then the backward's
    return {"layer_s": sum(per_row), "loops_s": per_row, "compile_s": compile_s, "chip": chip.name,
            "temp_gib": temp / 2 ** 30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5p-8")
    p.add_argument("--rows", type=int, default=8, help="rows per chip")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--remat", default="save_dots_except_mlp;save_all_names", help="';'-separated policies")
    p.add_argument("--attention", default="splash", help="','-separated backends")
    p.add_argument("--pallas_efficiency", type=float, default=0.5)
    a = p.parse_args(argv)
    print(f"7B LLM layer on {a.topology}, {a.rows} rows per chip of {a.seq} tokens, Pallas at "
          f"{a.pallas_efficiency:.0%} of peak (simulated, libtpu's cost model):", flush=True)
    ref = None
    for backend in a.attention.split(","):
        for remat in a.remat.split(";"):
            r = cell(a.topology, a.rows, a.seq, remat, backend, a.pallas_efficiency)
            ref = ref or r["layer_s"]
            loops = " + ".join(f"{x * 1e3:.2f}" for x in r["loops_s"])
            print(f"remat {remat}, attention {backend}: {r['layer_s'] * 1e3:.2f} ms a layer and row ({loops} in its "
                  f"layer loops; ratio to the first {r['layer_s'] / ref:.3f}); the {COMPILED_LAYERS}-layer program's "
                  f"temporaries {r['temp_gib']:.2f} GiB a chip; compile {r['compile_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
