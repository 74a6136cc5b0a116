"""The optimizer update: the previous step's select of old and new state vs the step's lax.cond skip (clipping with
the norm computed once), AdamW's first moment in float32 or bfloat16, in one run.

    .venv/bin/python bench/optimizer.py [--topology v5p-8] [--scale 16] [--rounds 40] [--print_only]

Parameters: one Mistral-7B layer's weights (4 × 4096², 3 × 4096×14336 = 218 M, float32). TPU: compiled through
libtpu for `--topology` with the weights fsdp-sharded over all chips; per chip the state's memory, XLA's
temporaries and the compiler's own cycle estimate of the update (the `estimated_cycles` of its fusions), as a
ratio to the reference (select, float32 moments). CPU: the same update at 1/`--scale` of the size, compile time and
median step time, the variants interleaved round by round (this machine is shared: the ratios are what to read).
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from bench_util import record  # noqa: E402
from genllava_jax import train  # noqa: E402

CLIP = 1.0
SHAPES = [(4096, 4096)] * 4 + [(4096, 14336)] * 3


def adamw(mu_dtype):
    return optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=0.1, mu_dtype=mu_dtype)


def select_step(mu_dtype):
    """The reference: the step before this change (optax clipping in the chain, then a select of old and new)."""
    tx = optax.chain(optax.clip_by_global_norm(CLIP), adamw(mu_dtype))

    def step(state, grads, loss):
        grad_norm = optax.global_norm(grads)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt": opt}
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), grad_norm

    return tx, step


def cond_step(mu_dtype):
    """train.train_step's update: clip with the step's norm, the AdamW update under lax.cond."""
    tx = optax.chain(optax.identity(), adamw(mu_dtype))

    def step(state, grads, loss):
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = train.clip_gradients(grads, grad_norm, CLIP)

        def update(params, opt):
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        params, opt = jax.lax.cond(ok, update, lambda p, o: (p, o), state["params"], state["opt"])
        return {"params": params, "opt": opt}, grad_norm

    return tx, step


VARIANTS = {("select", "float32"): (select_step, None), ("select", "bfloat16"): (select_step, "bfloat16"),
            ("cond", "float32"): (cond_step, None), ("cond", "bfloat16"): (cond_step, "bfloat16")}


def tpu(topology: str) -> dict:
    from launch import aot

    devices = aot.target_devices(topology)
    mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",))
    sh, rep = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    params = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh) for s in SHAPES]
    out = {}
    for key, (make, mu) in VARIANTS.items():
        tx, step = make(mu)
        opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh if x.ndim else rep),
                           jax.eval_shape(tx.init, params))
        loss = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        compiled = jax.jit(step, donate_argnums=(0,)).lower({"params": params, "opt": opt}, params, loss).compile()
        ma = compiled.memory_analysis()
        cycles = [int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', compiled.as_text())]
        out[key] = {"state": (ma.argument_size_in_bytes - aot.nbytes(params, True)) / aot.GiB,
                    "temps": ma.temp_size_in_bytes / aot.GiB, "cycles": sum(cycles), "fusions": len(cycles)}
        print(key, out[key], flush=True)
    return out


def cpu(scale: int, rounds: int) -> dict:
    r = np.random.default_rng(0)
    shapes = [(a // scale ** 0.5, b // scale ** 0.5) for a, b in SHAPES]
    params = [jnp.asarray(r.normal(size=(int(a), int(b))), jnp.float32) for a, b in shapes]
    grads = [jnp.asarray(r.normal(size=p.shape), jnp.float32) for p in params]
    fns, states, out = {}, {}, {}
    for key, (make, mu) in VARIANTS.items():
        tx, step = make(mu)
        states[key] = {"params": [p + 0 for p in params], "opt": tx.init(params)}
        t = time.perf_counter()
        fns[key] = jax.jit(step, donate_argnums=(0,)).lower(states[key], grads, jnp.float32(1)).compile()
        out[key] = {"compile": time.perf_counter() - t, "times": []}
    for _ in range(rounds):  # interleaved: a burst of load elsewhere hits every variant alike
        for key, f in fns.items():
            t = time.perf_counter()
            states[key], norm = f(states[key], grads, jnp.float32(1))
            norm.block_until_ready()
            out[key]["times"].append(time.perf_counter() - t)
    for key in out:
        out[key]["step"] = float(np.median(out[key].pop("times")))
    out["params"] = sum(p.size for p in params)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--topology", default="v5p-8")
    p.add_argument("--scale", type=int, default=16)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--print_only", action="store_true", help="do not write BENCHMARKS.md")
    a = p.parse_args()
    t, c = tpu(a.topology), cpu(a.scale, a.rounds)
    ref_t, ref_c = t[("select", "float32")], c[("select", "float32")]
    header = ["skip, first moment", f"{a.topology} per chip: optimizer state GiB", "temporaries GiB",
              "estimated cycles (ratio)", "fusions", f"CPU ({c['params'] / 1e6:.1f} M params): step ms (ratio)",
              "compile s"]
    rows = [[f"{k[0]}, {k[1]}", f"{t[k]['state']:.3f}", f"{t[k]['temps']:.3f}",
             f"{t[k]['cycles'] / 1e6:.2f} M ({t[k]['cycles'] / ref_t['cycles']:.3f})", str(t[k]['fusions']),
             f"{c[k]['step'] * 1e3:.1f} ({c[k]['step'] / ref_c['step']:.3f})", f"{c[k]['compile']:.2f}"]
            for k in VARIANTS]
    command = f"python bench/optimizer.py --topology {a.topology} --scale {a.scale} --rounds {a.rounds}"
    if a.print_only:
        print("\n".join(" | ".join(r) for r in [header] + rows))
        return
    record("optimizer", command, header, rows, note=(
        "One Mistral-7B layer's weights (218 M float32 parameters), fsdp over the slice's chips; `select` is the "
        "step before (optax's clip_by_global_norm in the chain, then jnp.where of old and new state), `cond` "
        "train.train_step's (clipped with the step's norm, update under lax.cond). Estimated cycles: libtpu's "
        "`estimated_cycles` of the update's fusions, summed (an estimate, not a measurement)."))


if __name__ == "__main__":
    main()
