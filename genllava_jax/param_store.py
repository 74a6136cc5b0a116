"""Our `params/` folder one array slice at a time, in the layout orbax restores (`checkpoint.load_module`).

`checkpoint.save_module` writes a whole model with orbax; conversion must never hold one. `ParamWriter` creates
every array of an abstract model with orbax's own tensorstore specs (zarr, zstd) and fills it as slices arrive, a
stacked (`layers`) parameter chunked one layer apiece so that writing a layer touches only its chunk; `finish()` then
writes orbax's tree metadata. `ParamReader` reads one array or one layer of any of our params folders, orbax's
OCDBT ones included, without restoring the rest.
"""

from __future__ import annotations

import ctypes
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from genllava_jax import errors

METADATA = "_METADATA"  # orbax's tree metadata file


def _key(k) -> tuple[str, int]:
    """(name, orbax key type: 1 sequence, 2 dict) of one jax tree path entry."""
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx), 1
    return str(k.key if isinstance(k, jax.tree_util.DictKey) else getattr(k, "name", k)), 2


def leaves(abs_state) -> dict[str, tuple[tuple, object]]:
    """{our "a/b/c" path: (orbax key path [(name, type)], the leaf)} of an nnx state, as orbax flattens it."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abs_state)[0]:
        keys = tuple(_key(k) for k in path)
        names = [n for n, _ in keys]
        ours = "/".join(names[:-1] if names[-1] == "value" else names)  # nnx Variables flatten to (..., "value")
        out[ours] = (keys, leaf)
    return out


def stacked(var: nnx.Variable) -> bool:
    """A parameter of stacked layers: its leading logical axis is `layers` (layers.stack_layers)."""
    names = var.get_metadata().get("out_sharding") or ()
    return bool(names) and names[0] == "layers"


def _layer_chunks(shape, dtype) -> ocp.SaveArgs:
    # one layer a chunk, or a few when a layer is small (orbax warns below 1 MiB; such arrays are read whole anyway)
    layer = math.prod(shape[1:]) * np.dtype(dtype).itemsize
    return ocp.SaveArgs(chunk_byte_size=max(layer, 2**20), shard_axes=(0,))


def save_args(abs_state):
    """orbax SaveArgs that chunk stacked parameters one layer apiece (one layer is then read alone)."""
    def one(var):
        a = var.get_value()
        if not stacked(var) or a.ndim < 2:
            return var.replace(ocp.SaveArgs())
        return var.replace(_layer_chunks(a.shape, a.dtype))

    return jax.tree.map(one, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _release_freed() -> None:
    """Hands freed heap memory back to the OS: glibc keeps what tensorstore's compression buffers freed resident
    (~0.15 GB after a 130 MB tensor), on top of which the next tensor is read (BENCHMARKS.md, convert)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class ParamWriter:
    """Creates the arrays of `abs_state` (nnx.eval_shape'd params) in `folder`; `write` fills them; `finish` checks
    that every array and layer was written and writes the metadata that makes the folder an orbax checkpoint."""

    def __init__(self, folder: str | Path, abs_state):
        self.folder = Path(folder).absolute()
        self.folder.mkdir(parents=True)
        self._leaves = leaves(abs_state)
        variables = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(abs_state)}
        if variables.keys() != self._leaves.keys():
            raise ValueError(f"cannot map the state's variables to its leaves: {sorted(variables)[:5]}")
        self._arrays, self._todo = {}, {}
        context = ocp.type_handlers.get_ts_context(use_ocdbt=False)
        for path, (keys, leaf) in self._leaves.items():
            var = variables[path]
            shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
            arg = _layer_chunks(shape, dtype) if stacked(var) and len(shape) > 1 else None
            info = ocp.type_handlers.ParamInfo(name=self._name(keys), parent_dir=self.folder, use_zarr3=False,
                                                ts_context=context)
            spec = ocp.type_handlers.get_json_tspec_write(info, use_ocdbt=False, global_shape=shape,
                                                          local_shape=shape, dtype=dtype, arg=arg)
            self._arrays[path] = ts.open(spec, create=True, context=context).result()
            self._todo[path] = set(range(shape[0])) if stacked(var) and shape else {None}

    @staticmethod
    def _name(keys) -> str:
        return ".".join(n for n, _ in keys)  # orbax's parameter name (its folder, without OCDBT)

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._leaves[path][1].shape)

    def write(self, path: str, value: np.ndarray, layer: int | None = None) -> None:
        """Writes the whole array, or slice `layer` of a stacked one (written alone: its own chunk)."""
        arr = self._arrays[path]
        want = self.shape(path)[1:] if layer is not None else self.shape(path)
        if tuple(value.shape) != want:
            raise ValueError(f"{path}{'' if layer is None else f'[{layer}]'}: shape {value.shape}, expected {want}")
        # tensorstore may then use `value` itself instead of a copy: it is C-ordered and the write is awaited
        value = np.ascontiguousarray(value).reshape(value.shape)  # (ascontiguousarray makes a 0-d array 1-d)
        whole = layer is None and self._todo[path] != {None}  # a stacked array given whole
        (arr if layer is None else arr[layer]).write(value, can_reference_source_data_indefinitely=True).result()
        self._todo[path] = set() if whole else self._todo[path] - {layer}
        _release_freed()

    def finish(self) -> None:
        missing = [f"{p}{'' if i is None else f'[{i}]'}" for p, todo in self._todo.items() for i in sorted(
            todo, key=lambda x: -1 if x is None else x)]
        if missing:
            raise ValueError(f"parameters never written: {missing[:10]}")
        tree = {str(tuple(n for n, _ in keys)): {
            "key_metadata": [{"key": n, "key_type": t} for n, t in keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(leaf.shape)}}
            for keys, leaf in self._leaves.values()}
        (self.folder / METADATA).write_text(json.dumps({
            "tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
        now = time.time_ns()
        (self.folder / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": {}}))


class ParamReader:
    """Reads arrays, or single layers of stacked ones, from a params folder (ours or orbax's) on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).absolute()
        meta_file = self.folder / METADATA
        if not meta_file.exists():
            raise errors.MissingFile(f"{self.folder}: no {METADATA}; not one of our checkpoints' params folders")
        meta = json.loads(meta_file.read_text())
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.folder)
        self._zarr3 = bool(meta.get("use_zarr3"))
        self._names = {}
        for entry in meta["tree_metadata"].values():
            names = [str(k["key"]) for k in entry["key_metadata"]]
            self._names["/".join(names[:-1] if names[-1] == "value" else names)] = ".".join(names)
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
        self._open: dict[str, ts.TensorStore] = {}

    def paths(self) -> list[str]:
        return list(self._names)

    def _array(self, path: str) -> ts.TensorStore:
        if path not in self._names:
            raise KeyError(f"{self.folder}: no parameter {path!r}")
        if path not in self._open:
            info = ocp.type_handlers.ParamInfo(name=self._names[path], parent_dir=self.folder,
                                               use_zarr3=self._zarr3, ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._open[path] = ts.open(spec, open=True, read=True, context=self._context).result()
        return self._open[path]

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._array(path).shape)

    def read(self, path: str, layer: int | None = None) -> np.ndarray:
        """The whole array, or slice `layer` of its leading axis (one chunk when it was written by layers)."""
        arr = self._array(path)
        return (arr if layer is None else arr[layer]).read().result()
