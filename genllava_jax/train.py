"""Training: the train state, the ONE jitted train step, checkpoints, and the loop.

    python -m genllava_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100]

The model is split once into (graphdef, trainable params, frozen params, other state). The step is a plain
`jax.jit` over pure functions with explicit in/out shardings from the logical-axis rules; the train state
(trainable params, optimizer state, step, rng) is donated, frozen parameters are not and never change. A step whose
loss or gradient norm is not finite is skipped (state unchanged) and counted.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from genllava_jax import sharding as shd


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and trainable parameters


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay, and global-norm clipping (config `train`)."""
    warmup = max(1, int(tc.warmup_frac * tc.steps)) if tc.get("warmup_steps") is None else tc.warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                                  end_value=tc.lr * tc.get("final_lr_frac", 0.0))
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay),
    ), schedule


def trainable_filter(patterns) -> Callable:
    """An nnx filter: Params whose "/"-joined path matches one of the regexes in `patterns`."""
    regexes = [re.compile(p) for p in patterns]

    def f(path, value):
        if not isinstance(value, nnx.Param):
            return False
        name = "/".join(str(p) for p in path)
        return any(r.match(name) for r in regexes)

    return f


# ---------------------------------------------------------------------------------------------------------------
# Train state and shardings


@dataclasses.dataclass
class Setup:
    """What the loop needs besides the state: the static graph, the frozen params, shardings and the step fns."""

    graphdef: Any
    frozen: Any
    rest: Any
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Callable[[Any], Any]
    tx: optax.GradientTransformation
    schedule: Callable
    mesh: Any


def _opt_shardings(abs_opt, abs_params, param_shardings, mesh):
    """Optimizer-state leaves shaped like the params (mu, nu, ...) take their shardings; the rest is replicated."""
    pdef = jax.tree.structure(abs_params)
    replicated = NamedSharding(mesh, P())

    def one(sub):
        if jax.tree.structure(sub) == pdef:
            return param_shardings
        return jax.tree.map(lambda _: replicated, sub)

    return jax.tree.map(one, abs_opt, is_leaf=lambda x: jax.tree.structure(x) == pdef)


def setup(model: nnx.Module, tc, mesh, seed: int = 0):
    """Splits an (already sharded) model into the donated train state and the frozen rest."""
    trainable = trainable_filter(tc.trainable)
    graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"train.trainable={list(tc.trainable)} matches no parameter")
    tx, schedule = make_optimizer(tc)
    param_sh = shd.state_shardings(params, mesh)
    abs_opt = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())
    state_sh = {"params": param_sh, "opt": _opt_shardings(abs_opt, params, param_sh, mesh),
                "step": replicated, "rng": replicated}
    state = jax.jit(lambda p: {"params": p, "opt": tx.init(p), "step": jnp.zeros((), jnp.int32),
                               "rng": jax.random.PRNGKey(seed)}, out_shardings=state_sh)(params)

    def batch_sharding(batch):
        return jax.tree.map(lambda x: NamedSharding(mesh, shd.logical_to_spec(
            ("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)), batch)

    return state, Setup(graphdef, frozen, rest, state_sh, shd.state_shardings(frozen, mesh), batch_sharding, tx,
                        schedule, mesh)


def to_global(batch: dict, s: Setup) -> dict:
    """This process's numpy batch -> global jax arrays sharded over (data, fsdp), on one host or many."""
    global_shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in batch.items()}
    shardings = s.batch_sharding({k: jax.ShapeDtypeStruct(shp, batch[k].dtype) for k, shp in global_shapes.items()})
    return {k: jax.make_array_from_process_local_data(shardings[k], v, global_shapes[k]) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# The step


def _loss(graphdef, params, frozen, rest, batch, rng):
    model = nnx.merge(graphdef, params, frozen, rest)
    return model.loss(batch, rng)


def train_step(state, frozen, batch, *, graphdef, rest, tx, schedule, accum: int = 1):
    """One optimizer update; with `accum` > 1 the batch's leading axis is split into micro-batches (lax.scan)."""
    rng = jax.random.fold_in(state["rng"], state["step"])
    grad_fn = jax.value_and_grad(functools.partial(_loss, graphdef), has_aux=True)
    if accum == 1:
        (loss, aux), grads = grad_fn(state["params"], frozen, rest, batch, rng)
    else:
        # micro-batch i takes rows i, i+accum, ...: every device keeps its own rows (no resharding)
        micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), batch)

        out_shape = jax.eval_shape(grad_fn, state["params"], frozen, rest, jax.tree.map(lambda x: x[0], micro), rng)

        def body(carry, inputs):
            i, mb = inputs
            out = grad_fn(state["params"], frozen, rest, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, out), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_shape)
        ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    grad_norm = optax.global_norm(grads)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1,
           "rng": state["rng"]}
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new["params"], new["opt"] = jax.tree.map(lambda a, b: jnp.where(ok, a, b), (new["params"], new["opt"]),
                                             (state["params"], state["opt"]))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "skipped": (~ok).astype(jnp.int32),
               **aux}
    return new, metrics


def jit_train_step(s: Setup, accum: int = 1):
    """The one jitted step: explicit shardings, the train state donated."""
    fn = functools.partial(train_step, graphdef=s.graphdef, rest=s.rest, tx=s.tx, schedule=s.schedule, accum=accum)
    return jax.jit(fn, in_shardings=(s.state_shardings, s.frozen_shardings, None),
                   out_shardings=(s.state_shardings, None), donate_argnums=(0,))


def jit_eval_step(s: Setup):
    def fn(params, frozen, batch, rng):
        return _loss(s.graphdef, params, frozen, s.rest, batch, rng)[1]

    return jax.jit(fn, in_shardings=(s.state_shardings["params"], s.frozen_shardings, None))


def merged_model(state, s: Setup) -> nnx.Module:
    return nnx.merge(s.graphdef, state["params"], s.frozen, s.rest)
