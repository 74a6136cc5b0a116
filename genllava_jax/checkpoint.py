"""Our on-disk format for one model: `config.json` (part name + config) and an orbax `params/` checkpoint.

Restoring builds the model abstractly (`nnx.eval_shape`), gives every parameter the sharding the rules assign on
the requested mesh, and lets orbax read each shard straight onto its devices.

Training checkpoints (train state + frozen params + data iterator) carry in their metadata a checksum of every
array and of each process's data-iterator state, and are never written with a non-finite value. Restoring takes the
newest step that reads back whole and whose restored arrays and iterator state match those checksums, so a change to
any file a restore reads either fails the read or is caught, unless it changes nothing restored; a partial or
corrupt step (unfinished save, missing metadata, truncated or deleted file, changed bytes) is reported by step and
problem in one line and moved aside to `corrupt_checkpoints/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from genllava_jax import errors, param_store
from genllava_jax import sharding as shd
from genllava_jax.atomic import atomic_write
from genllava_jax.models import abstract_model, lookup


def save_module(path, module: nnx.Module, part: str, overwrite: bool = False) -> None:
    """Writes `path/config.json` and `path/params` atomically (a temporary directory renamed into place)."""
    with atomic_write(path, directory=True, overwrite=overwrite) as tmp:
        write_config(tmp, part, module.cfg)
        state = nnx.state(module, nnx.Param)
        with ocp.StandardCheckpointer() as ckptr:  # stacked layers chunked one apiece: an export reads them singly
            ckptr.save((tmp / "params").absolute(), state, save_args=param_store.save_args(state))
            ckptr.wait_until_finished()


def write_config(folder, part: str, cfg) -> None:
    """`folder/config.json`: the part's name and its config (what `read_config` rebuilds the model from)."""
    (Path(folder) / "config.json").write_text(json.dumps({"part": part, "config": dataclasses.asdict(cfg)}, indent=2))


def read_config(path):
    """(part name, config, model class) of one of our part checkpoints; a missing or foreign config.json is an error
    naming it."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise errors.MissingFile(f"{file}: not found; {path} is not one of our checkpoints (python -m convert writes "
                                 f"them)")
    try:
        meta = json.loads(file.read_text())
        cfg_cls, model_cls = lookup(meta["part"])
        return meta["part"], cfg_cls(**meta["config"]), model_cls
    except (ValueError, KeyError, TypeError) as e:
        raise errors.BadValue(f"{file}: not one of our checkpoints' configs ({type(e).__name__}: {e})") from e


def load_module(path, mesh=None, rules=None, **overrides) -> nnx.Module:
    """Restores a module saved by `save_module`, sharded on `mesh` (default: the first local device)."""
    part, cfg, model_cls = read_config(path)
    cfg = dataclasses.replace(cfg, **overrides)
    if mesh is None:
        mesh = shd.make_mesh({"data": 1}, jax.local_devices()[:1])
    abstract = abstract_model(model_cls, cfg)
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = shd.state_shardings(abs_params, mesh, rules)
    target = shd.with_shardings(abs_params, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(Path(path).absolute() / "params", target)
    return nnx.merge(graphdef, params, rest)


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: train state + frozen params + data iterator, with orbax's CheckpointManager.


def train_manager(directory, save_every: int, keep: int, log=print) -> ocp.CheckpointManager:
    """Async saves every `save_every` steps, the newest `keep` kept; every host joins (orbax coordinates them).

    Unfinished saves (orbax's temporary folders, left by a kill during a save) are reported and removed.
    """
    directory = Path(directory).absolute()
    if jax.process_index() == 0:
        for tmp in sorted(directory.glob("*.orbax-checkpoint-tmp*")):
            log(f"checkpoint {tmp.name}: an unfinished save (the run was killed while writing it); removed")
            shutil.rmtree(tmp)
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           enable_async_checkpointing=True, create=True)
    quiet, logger = _HoldOrbaxLogs("_CHECKPOINT_METADATA"), logging.getLogger("absl")
    logger.addFilter(quiet)  # a missing or unreadable one: restore_latest reports that step and moves it aside
    try:
        return ocp.CheckpointManager(directory, options=options)
    finally:
        logger.removeFilter(quiet)


def _leaf_paths(tree) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]


@jax.jit
def _fingerprint(tree):
    """Per array: a position-weighted sum of its bits (uint32, wrapping) and whether it is all finite.

    Integer sums are exact and order-free, so the value does not depend on the sharding it is computed under.
    """
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        weight = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * np.uint32(0x9E3779B1) + np.uint32(1)
        finite = jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        return jnp.sum(bits.astype(jnp.uint32) * weight, dtype=jnp.uint32), finite

    return [one(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> tuple[dict[str, int], list[str]]:
    """({array path: checksum}, [paths of arrays holding inf or nan]) of a pytree of arrays."""
    out = jax.device_get(_fingerprint(tree))
    paths = _leaf_paths(tree)
    return {p: int(c) for p, (c, _) in zip(paths, out)}, [p for p, (_, ok) in zip(paths, out) if not ok]


def data_checksum(data_iter) -> int:
    """A checksum of a data iterator's state (what grain saves as JSON), independent of key order."""
    text = json.dumps(data_iter.get_state(), sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")  # 56 bits: exact in JSON and int64


def _all_processes(value: int) -> list[int]:
    """Every process's 56-bit value (a collective when there are several). Sent as 7 bytes: an int64 would be
    truncated to int32 by the gather unless jax_enable_x64 is on."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.frombuffer(value.to_bytes(7, "big"), np.uint8))
    return [int.from_bytes(bytes(np.asarray(row, np.uint8)), "big") for row in np.asarray(got).reshape(-1, 7)]


def save_train(mngr: ocp.CheckpointManager, step: int, state, frozen, data_iter, force: bool = False) -> bool:
    """Saves (asynchronously) if the step is due or `force`; refuses non-finite values (FloatingPointError)."""
    import grain

    if not force and not mngr.should_save(step):
        return False
    checksums, non_finite = fingerprint({"state": state, "frozen": frozen})
    if non_finite:
        raise FloatingPointError(f"step {step}: non-finite values in {non_finite[:5]}: not saving this checkpoint "
                                 f"(the newest saved is step {mngr.latest_step()})")
    data = _all_processes(data_checksum(data_iter))  # each process saves its own iterator state
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), frozen=ocp.args.StandardSave(frozen),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return mngr.save(step, args=args, force=force, custom_metadata={"checksums": checksums, "data_checksums": data})


def restore_train(mngr: ocp.CheckpointManager, step: int, state_target, frozen_target, data_iter):
    """(state, frozen) restored into the given abstract targets (shapes + shardings); the iterator in place."""
    import grain

    args = ocp.args.Composite(state=ocp.args.StandardRestore(state_target),
                              frozen=ocp.args.StandardRestore(frozen_target),
                              data=grain.checkpoint.CheckpointRestore(data_iter))
    out = mngr.restore(step, args=args)
    return out["state"], out["frozen"]


class _HoldOrbaxLogs(logging.Filter):
    """Holds orbax's log records (those `about` a text, if given): faults we report in one line of our own would
    otherwise be logged a second time, some with a traceback."""

    def __init__(self, about: str = ""):
        super().__init__()
        self.held, self.about = [], about

    def filter(self, record):
        if f"{os.sep}orbax{os.sep}" in record.pathname and self.about in record.getMessage():
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def _trying_a_step():
    """Quiet while a checkpoint is tried: orbax reads arrays in concurrent coroutines, and when one read fails Python
    prints each sibling's error as "Exception ignored in <coroutine ...>" with a traceback; orbax logs its own
    errors too. Yields a list to append to if the try failed; otherwise the held logs are passed on."""
    failed, hook, hold, logger = [], sys.unraisablehook, _HoldOrbaxLogs(), logging.getLogger("absl")
    sys.unraisablehook = lambda unraisable: None
    logger.addFilter(hold)
    try:
        yield failed
    finally:
        gc.collect()  # finalise the failed coroutines now, while their errors are silenced
        sys.unraisablehook = hook
        logger.removeFilter(hold)
        for record in hold.held if not failed else ():
            logger.handle(record)


def _read_error(e: Exception) -> str:
    text = str(e).split(" See full TensorStore details")[0]  # the rest is a multi-line spec dump
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _check_step(mngr, step, state_target, frozen_target, data_iter, log):
    """((state, frozen), None) if the step reads back whole and matches its checksums, else (None, the problem)."""
    meta = mngr.directory / str(step) / "_CHECKPOINT_METADATA"  # written last, when the save is finalised
    if not meta.exists():
        return None, "its _CHECKPOINT_METADATA file is missing"
    try:
        custom = json.loads(meta.read_text()).get("custom_metadata") or {}
        saved, saved_data = custom.get("checksums"), custom.get("data_checksums")
    except (ValueError, AttributeError) as e:
        return None, f"its _CHECKPOINT_METADATA file is unreadable ({e})"
    with _trying_a_step() as failed:
        try:
            state, frozen = restore_train(mngr, step, state_target, frozen_target, data_iter)
        except Exception as e:  # orbax / tensorstore / json raise many kinds for missing or truncated files
            failed.append(f"it cannot be read: {_read_error(e)}")
    if failed:
        return None, failed[0]
    if saved is None:
        log(f"checkpoint step {step} was saved without checksums; restored unverified")
        return (state, frozen), None
    got, _ = fingerprint({"state": state, "frozen": frozen})
    changed = sorted(p for p in saved.keys() | got.keys() if saved.get(p) != got.get(p))
    if changed:
        return None, (f"checksum mismatch in {len(changed)} arrays, e.g. {changed[:3]} (the files changed after the "
                      f"save)")
    if saved_data is None:
        log(f"checkpoint step {step} was saved without a data-iterator checksum; its iterator state is unverified")
    elif len(saved_data) != jax.process_count():
        return None, f"its data iterator states are of {len(saved_data)} processes, this run has {jax.process_count()}"
    elif saved_data[jax.process_index()] != data_checksum(data_iter):
        return None, (f"checksum mismatch in the data iterator state of process {jax.process_index()} "
                      f"(data/process_{jax.process_index()}-of-{jax.process_count()}.json changed after the save)")
    return (state, frozen), None


def _all_hosts_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def restore_latest(mngr: ocp.CheckpointManager, state_target, frozen_target, data_iter, log=print):
    """(state, frozen, step) of the newest usable checkpoint, the data iterator restored in place; None if there are
    no checkpoints. Unusable steps are reported and moved to `<directory>/../corrupt_checkpoints/`."""
    problems = []
    for step in sorted(mngr.all_steps(), reverse=True):
        out, problem = _check_step(mngr, step, state_target, frozen_target, data_iter, log)
        if not _all_hosts_ok(out is not None):
            problem = problem or "it cannot be read on another host"
        if problem is None:
            return (*out, step)
        problems.append(f"step {step}: {problem}")
        dest = mngr.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        log(f"checkpoint step {step} is unusable: {problem}; moved to {dest}; trying an older one")
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            (mngr.directory / str(step)).rename(dest)  # out of the way: this step number is saved again later
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moved checkpoint {step}")
        mngr.reload()
    if problems:
        raise errors.Stopped(f"no usable checkpoint in {mngr.directory}: {'; '.join(problems)}. They were moved to "
                             f"{mngr.directory.parent / 'corrupt_checkpoints'}; rerun to start from step 0, or "
                             f"move one back if it can be repaired")
    return None


def partial_restore_args(target):
    """Restore args for part of a saved pytree (e.g. the params of a train state without its optimizer moments):
    only the leaves of `target` (ShapeDtypeStructs with shardings) are read."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
    return ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)


def abstract_like(tree):
    """ShapeDtypeStructs carrying the shardings of a (possibly donated-later) pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
