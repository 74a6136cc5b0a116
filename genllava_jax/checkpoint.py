"""Our on-disk format for one model: `config.json` (part name + config) and an orbax `params/` checkpoint.

Restoring builds the model abstractly (`nnx.eval_shape`), gives every parameter the sharding the rules assign on
the requested mesh, and lets orbax read each shard straight onto its devices.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from genllava_jax import sharding as shd
from genllava_jax.models import lookup


def save_module(path, module: nnx.Module, part: str, overwrite: bool = False) -> None:
    """Writes `path/config.json` and `path/params` atomically (a temporary directory renamed into place)."""
    from convert.common import atomic_dir

    with atomic_dir(path, overwrite) as tmp:
        cfg = dataclasses.asdict(module.cfg)
        (tmp / "config.json").write_text(json.dumps({"part": part, "config": cfg}, indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), nnx.state(module, nnx.Param))
            ckptr.wait_until_finished()


def read_config(path):
    meta = json.loads((Path(path) / "config.json").read_text())
    cfg_cls, model_cls = lookup(meta["part"])
    return meta["part"], cfg_cls(**meta["config"]), model_cls


def load_module(path, mesh=None, rules=None, **overrides) -> nnx.Module:
    """Restores a module saved by `save_module`, sharded on `mesh` (default: the first local device)."""
    part, cfg, model_cls = read_config(path)
    cfg = dataclasses.replace(cfg, **overrides)
    if mesh is None:
        mesh = shd.make_mesh({"data": 1}, jax.local_devices()[:1])
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = shd.state_shardings(abs_params, mesh, rules)
    target = restore_target(abs_params, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(Path(path).absolute() / "params", target)
    return nnx.merge(graphdef, params, rest)


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: train state + frozen params + data iterator, with orbax's CheckpointManager.


def train_manager(directory, save_every: int, keep: int) -> ocp.CheckpointManager:
    """Async saves every `save_every` steps, the newest `keep` kept; every host joins (orbax coordinates them)."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_train(mngr: ocp.CheckpointManager, step: int, state, frozen, data_iter, force: bool = False) -> bool:
    import grain

    args = ocp.args.Composite(state=ocp.args.StandardSave(state), frozen=ocp.args.StandardSave(frozen),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return mngr.save(step, args=args, force=force)


def restore_train(mngr: ocp.CheckpointManager, step: int, state_target, frozen_target, data_iter):
    """(state, frozen) restored into the given abstract targets (shapes + shardings); the iterator in place."""
    import grain

    args = ocp.args.Composite(state=ocp.args.StandardRestore(state_target),
                              frozen=ocp.args.StandardRestore(frozen_target),
                              data=grain.checkpoint.CheckpointRestore(data_iter))
    out = mngr.restore(step, args=args)
    return out["state"], out["frozen"]


def restore_target(abstract, shardings):
    """ShapeDtypeStructs of an abstract pytree, each carrying its sharding: what orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_like(tree):
    """ShapeDtypeStructs carrying the shardings of a (possibly donated-later) pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
