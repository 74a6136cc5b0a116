"""The optimizer step: clipping with the step's own gradient norm equals optax's clip_by_global_norm chain, a
non-finite step leaves the state as it was, and AdamW's first moment can be kept in bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genllava_jax import train
from genllava_jax.config import train_config


class Toy(nnx.Module):
    """A linear regression with the `loss(batch, rng)` the train step calls."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32))

    def loss(self, batch, rng):
        err = batch["x"] @ self.w[...] - batch["y"]
        return jnp.mean(err ** 2) * batch["scale"][0], {}


def tc(**kw):
    c = train_config()
    c.update(steps=10, lr=0.1, warmup_frac=0.1, b1=0.9, b2=0.999, weight_decay=0.1, grad_clip=0.5, **kw)
    return c


def run(steps, scales, **kw):
    """(states after each step) of the toy under train.train_step."""
    c = tc(**kw)
    graphdef, params, rest = nnx.split(Toy(), nnx.Param, ...)
    tx, schedule = train.make_optimizer(c)
    state = train.init_state(params, tx=tx, seed=0)
    step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, rest=rest, tx=tx, schedule=schedule,
                                     grad_clip=c.grad_clip))
    r = np.random.default_rng(1)
    out = []
    for i in range(steps):
        batch = {"x": jnp.asarray(r.normal(size=(8, 6)), jnp.float32), "y": jnp.asarray(r.normal(size=(8, 3))),
                 "scale": jnp.full((1,), scales[i], jnp.float32)}
        state, metrics = step(state, nnx.State({}), batch)
        out.append((state, metrics))
    return out


def test_clipping_by_the_steps_norm_equals_optax_clip_by_global_norm():
    grads = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([[12.0]])}
    for max_norm in (1.0, 100.0):
        want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        got = train.clip_gradients(grads, optax.global_norm(grads), max_norm)
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_step_equals_optax_chain_and_skips_non_finite_steps():
    states = run(4, [1.0, 5.0, np.inf, 1.0])
    # the reference: optax's own chain, clipping included, on the same gradients
    c = tc()
    graphdef, params, rest = nnx.split(Toy(), nnx.Param, ...)
    ref_tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), train.make_optimizer(c)[0])
    opt = ref_tx.init(params)
    r = np.random.default_rng(1)
    for i, scale in enumerate([1.0, 5.0, np.inf, 1.0]):
        batch = {"x": jnp.asarray(r.normal(size=(8, 6)), jnp.float32), "y": jnp.asarray(r.normal(size=(8, 3))),
                 "scale": jnp.full((1,), scale, jnp.float32)}
        grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest).loss(batch, None)[0])(params)
        if np.isfinite(scale):
            updates, opt = ref_tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
        state, metrics = states[i]
        assert int(metrics["skipped"]) == (not np.isfinite(scale)) and int(state["skipped"]) == (i >= 2)
        np.testing.assert_allclose(state["params"]["w"][...], params["w"][...], rtol=1e-6)


def test_bfloat16_first_moment():
    f32, bf16 = run(5, [1.0] * 5), run(5, [1.0] * 5, mu_dtype="bfloat16")
    adam = bf16[-1][0]["opt"][1][0]
    assert adam.mu["w"][...].dtype == jnp.bfloat16 and adam.nu["w"][...].dtype == jnp.float32
    np.testing.assert_allclose(bf16[-1][0]["params"]["w"][...], f32[-1][0]["params"]["w"][...], rtol=0.02,
                               atol=1e-3)
