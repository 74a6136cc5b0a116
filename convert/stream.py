"""File-to-file conversion that never holds the model: what `python -m convert` runs.

Import: each HF tensor is read from its (sharded) safetensors file, transformed and written into its slice of our
checkpoint (`genllava_jax.param_store`: a stacked parameter is one zarr chunk a layer) before the next is read.
Export: our checkpoint is read a tensor (a layer) at a time into safetensors shards whose headers are planned up
front, so each tensor goes to disk as soon as it is read. Host memory stays at a few copies of the largest tensor
beyond the baseline (BENCHMARKS.md, convert). Both write into a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from genllava_jax import checkpoint, param_store
from genllava_jax.atomic import atomic_write
from genllava_jax.models import abstract_model, lookup

from .common import ConversionError, Layout, Source, flat_vars, hf_slices

# numpy dtype name -> safetensors dtype code
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
          "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: known before it is read, read when its turn to be written comes."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---------------------------------------------------------------------------------------------------------------
# Import


def import_hf(hf_source: Callable[..., Source], path, out, part: str, *, dtype: str | None = None,
              overwrite: bool = False, **overrides) -> str:
    """Converts the HF folder `path` into our checkpoint `out` (config.json + params/); returns the stored dtype,
    by default the checkpoint's own (`Source.dtype`)."""
    source = hf_source(path, **overrides)
    if not isinstance(source.model, lookup(part)[1]):
        raise ConversionError(f"{path}: holds a {type(source.model).__name__}, but our {part!r} checkpoints are "
                              f"{lookup(part)[1].__name__}s")
    stored = dtype or source.dtype()
    if source.model.cfg.param_dtype != stored:
        source = hf_source(path, **{**overrides, "param_dtype": stored})
    todo = {}  # hf key -> (rule, our path, our layer shape, layer, dtype)
    for rule, p, shape, dt in source.entries():  # every key and shape checked before anything is written
        for i in range(shape[0]) if rule.stacked else (None,):
            todo[rule.hf if i is None else rule.key(i)] = (rule, p, shape[1:] if rule.stacked else shape, i, dt)
    with atomic_write(out, directory=True, overwrite=overwrite) as tmp:
        checkpoint.write_config(tmp, part, source.model.cfg)
        writer = param_store.ParamWriter(tmp / "params", nnx.state(source.model, nnx.Param))
        for key in source.reader.keys():  # file by file: each file is read once, front to back
            if key in todo:
                rule, p, layer_shape, i, dt = todo[key]
                writer.write(p, rule.transform.to_ours(source.reader.get(key), layer_shape).astype(dt, copy=False), i)
        writer.finish()
    return stored


# ---------------------------------------------------------------------------------------------------------------
# Export


def write_safetensors(tensors: Sequence[Tensor], folder: Path, prefix: str = "model",
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes size-bounded shards (and, for more than one, `{prefix}.safetensors.index.json`), one tensor at a time:
    each shard's header is written first from the tensors' shapes, then their data as each is read."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
                                                     for i in range(1, n + 1)]
    for name, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in shard:
            header[t.key] = {"dtype": _CODES[t.dtype.name], "shape": list(t.shape),
                             "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(folder / name, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for t in shard:
                a = t.read()
                if tuple(a.shape) != t.shape or a.dtype != t.dtype:
                    raise ConversionError(f"{t.key}: got {a.dtype}{tuple(a.shape)}, planned {t.dtype}{t.shape}")
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.key: name for name, shard in zip(names, shards) for t in shard}}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _with_torch_dtype(hf_config: dict, dtype: str) -> dict:
    """The config recording the exported dtype, in its nested part configs too (BLIP-2, LLaVA)."""
    out = {**hf_config, "torch_dtype": dtype}
    for sub in ("qformer_config", "text_config", "vision_config"):
        if isinstance(out.get(sub), dict):
            out[sub] = {**out[sub], "torch_dtype": dtype}
    return out


def write_hf(path, layout: Layout, tensors: Sequence[Tensor], dtype: str, *, max_shard_bytes: int = 5 * 2**30,
             overwrite: bool = False) -> None:
    """config.json (recording `dtype` as torch_dtype) + safetensors shards (+ index), into a temporary folder
    renamed to `path` at the end."""
    with atomic_write(path, directory=True, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(_with_torch_dtype(layout.hf_config, dtype), indent=2))
        write_safetensors(tensors, tmp, prefix=layout.file_prefix, max_shard_bytes=max_shard_bytes)


def _tensors(layout: Layout, abstract_state, read: Callable, dtype) -> list[Tensor]:
    """The HF tensors of `layout`; `read(path, layer)` gives our array or layer; cast to `dtype` if given."""
    ours = flat_vars(abstract_state)
    out = []
    for key, hf_shape, rule, path, i in hf_slices(layout.rules, abstract_state):
        dt = np.dtype(dtype or ours[path].get_value().dtype)

        def get(rule=rule, path=path, i=i, hf_shape=hf_shape, dt=dt):
            # np.require, not ascontiguousarray: that makes a 0-d tensor (CLIP's logit_scale) 1-d
            return np.require(rule.transform.to_hf(read(path, i), hf_shape).astype(dt, copy=False), requirements="C")

        out.append(Tensor(key, hf_shape, dt, get))
    return out


def _stored_dtype(abstract_state) -> str:
    dtypes = {np.dtype(v.get_value().dtype).name for v in flat_vars(abstract_state).values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def module_tensors(model: nnx.Module, layout: Layout, dtype=None) -> list[Tensor]:
    """The HF tensors of an in-memory model, each fetched from its devices when it is written."""
    state = nnx.state(model, nnx.Param)
    arrays = {p: v.get_value() for p, v in flat_vars(state).items()}

    def read(p, i):
        return np.asarray(jax.device_get(arrays[p] if i is None else arrays[p][i]))

    return _tensors(layout, state, read, dtype)


def open_checkpoint(our_dir, part: str | None = None) -> tuple[nnx.Module, param_store.ParamReader]:
    """(the abstract model, a lazy reader of its parameters) of our checkpoint `our_dir`, checked against its
    config; `part`, if given, is the part it must hold."""
    saved_part, cfg, model_cls = checkpoint.read_config(our_dir)
    if part is not None and saved_part != part:
        raise ConversionError(f"{Path(our_dir) / 'config.json'}: a {saved_part!r} checkpoint, not {part!r}")
    abstract = abstract_model(model_cls, cfg)
    reader = param_store.ParamReader(Path(our_dir) / "params")
    for p, var in flat_vars(nnx.state(abstract, nnx.Param)).items():
        if p not in reader.paths():
            raise ConversionError(f"{Path(our_dir) / 'params'}: parameter {p!r} is missing")
        if reader.shape(p) != tuple(var.get_value().shape):
            raise ConversionError(f"{Path(our_dir) / 'params'}: parameter {p!r} has shape {reader.shape(p)}, its "
                                  f"config needs {tuple(var.get_value().shape)}")
    return abstract, reader


def checkpoint_tensors(abstract: nnx.Module, reader: param_store.ParamReader, layout: Layout,
                       dtype=None) -> list[Tensor]:
    """The HF tensors of our checkpoint (`open_checkpoint`), each read (a layer at a time) when it is written."""
    return _tensors(layout, nnx.state(abstract, nnx.Param), reader.read, dtype)


def dtype_name(models: Sequence[nnx.Module], dtype=None) -> str:
    """What the export records as torch_dtype: `dtype`, else the parameters' own (float32 if they differ)."""
    if dtype:
        return np.dtype(dtype).name
    names = {_stored_dtype(nnx.state(m, nnx.Param)) for m in models}
    return names.pop() if len(names) == 1 else "float32"


def export_module(model: nnx.Module, layout: Layout, path, *, dtype=None, **kw) -> None:
    """Writes an in-memory model in HF form."""
    write_hf(path, layout, module_tensors(model, layout, dtype), dtype_name([model], dtype), **kw)


def export_checkpoint(our_dir, path, layout_of: Callable[[nnx.Module], Layout], *, part: str | None = None,
                      dtype=None, **kw) -> None:
    """Writes our checkpoint `our_dir` in HF form, read a tensor (a layer) at a time: never restored whole."""
    abstract, reader = open_checkpoint(our_dir, part)
    layout = layout_of(abstract)
    write_hf(path, layout, checkpoint_tensors(abstract, reader, layout, dtype), dtype_name([abstract], dtype), **kw)
