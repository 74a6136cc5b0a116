"""Machinery shared by the converters: key tables, tensor transforms, reading HF checkpoints tensor by tensor.

A converter is one table of `Rule(hf_key, our_path, transform)`; the same table serves both directions.
`{i}` in a rule marks a per-layer key stacked into the leading (layers) axis of our parameter; slice i of that
axis is HF layer `stride * i + offset` (1 and 0 unless layers alike only every few are stacked together).

Each part module offers `hf_source(path, **overrides) -> Source` (the reader, table and abstract model of a HF
folder) and `layout(model) -> Layout` (the table, HF config and file name of its export). From them, `load_state`
builds a model in memory (each device shard read straight from the files by `jax.make_array_from_callback`), and
`convert.stream` converts file to file without ever holding the model (`python -m convert`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from genllava_jax import errors
from genllava_jax import sharding as shd


class ConversionError(errors.BadValue):
    """A checkpoint does not match the model: names the key, the file or the shape."""


# ---------------------------------------------------------------------------------------------------------------
# Transforms between one HF tensor and one (per-layer) slice of ours.


@dataclasses.dataclass(frozen=True)
class Copy:
    """Same values; a reshape only (e.g. a (1, 1, D) token in HF against our (1, D))."""

    def to_ours(self, t: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        return t.reshape(shape)

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)

    def to_hf(self, a: np.ndarray, hf_shape: Sequence[int]) -> np.ndarray:
        return a.reshape(hf_shape)


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch (out, in) weight against our kernel (in..., out...), whose first `n_in` axes are the input."""

    n_in: int = 1

    def to_ours(self, t, shape):
        return t.T.reshape(shape)

    def hf_shape(self, shape):
        return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

    def to_hf(self, a, hf_shape):
        return a.reshape(hf_shape[::-1]).T


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch OIHW conv weight against our HWIO kernel."""

    def to_ours(self, t, shape):
        return t.transpose(2, 3, 1, 0).reshape(shape)

    def hf_shape(self, shape):
        h, w, i, o = shape
        return (o, i, h, w)

    def to_hf(self, a, hf_shape):
        return a.transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Flat:
    """A flat torch tensor against our multi-axis one, e.g. a q bias (N*H,) against our (N, H)."""

    def to_ours(self, t, shape):
        return t.reshape(shape)

    def hf_shape(self, shape):
        return (math.prod(shape),)

    def to_hf(self, a, hf_shape):
        return a.reshape(hf_shape)


COPY, LINEAR, CONV, FLAT = Copy(), Linear(), Conv(), Flat()


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    ours: str  # "/"-joined path in our nnx state, e.g. "layers/q/kernel"
    transform: Copy | Linear | Conv | Flat = COPY
    stride: int = 1  # slice i of our layers axis is HF layer stride * i + offset
    offset: int = 0

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def key(self, i: int) -> str:
        """The HF key of slice i of our stacked parameter."""
        return self.hf.format(i=self.stride * i + self.offset)


def read_json(path: str | os.PathLike) -> dict:
    """A config file as a dict; a missing or malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: not found (a Hugging Face folder has its config.json beside the weights)")
    try:
        out = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise ConversionError(f"{path}: holds a {type(out).__name__}, not a JSON object")
    return out


def with_prefix(rules: Iterable[Rule], prefix: str) -> tuple[Rule, ...]:
    """The same table for a checkpoint that nests the part under `prefix` (e.g. "vision_model.")."""
    return tuple(dataclasses.replace(r, hf=prefix + r.hf) for r in rules)


def find_prefix(keys: Iterable[str], anchor: str) -> str:
    """What precedes `anchor` (a key every layout of a part has) in the checkpoint's keys; it must be unique."""
    found = sorted({k[:-len(anchor)] for k in keys if k.endswith(anchor) and k[:-len(anchor)][-1:] in ("", ".")})
    if len(found) != 1:
        raise ConversionError(f"expected one key ending in {anchor!r}, found prefixes {found}; pass prefix=")
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# Reading HF checkpoints tensor by tensor.


class TensorReader:
    """Keys, shapes and tensors of a folder with `model.safetensors`, a sharded index, or a `.bin` file.

    `prefix` names the files (diffusers: "diffusion_pytorch_model"); `rename` maps the checkpoint's keys to the
    names the rules use (e.g. legacy names to current ones). Headers are read once; each `get` maps its file only
    for the one tensor it copies out (a file kept mapped counts every page read from it in the process's memory).
    """

    _FLOAT = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

    def __init__(self, folder: str | os.PathLike, prefix: str = "model", rename: Callable[[str], str] | None = None):
        self.folder = Path(folder)
        self._files: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], str | None]] = {}  # key -> (shape, float dtype or None)
        self._torch: dict[str, object] | None = None
        index = self.folder / f"{prefix}.safetensors.index.json"
        single = self.folder / f"{prefix}.safetensors"
        binary = self.folder / ("pytorch_model.bin" if prefix == "model" else f"{prefix}.bin")
        if self.folder.is_file():  # a bare checkpoint file (e.g. a .pth state dict) rather than a folder
            single, binary = (self.folder, index) if self.folder.suffix == ".safetensors" else (index, self.folder)
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from e
            for key, fname in weight_map.items():
                self._files[key] = self.folder / fname
        elif single.exists():
            self._files = {k: single for k in self._header(single)}
        elif binary.exists():
            import torch  # pickles are read only with weights_only=True: no code runs from the file

            try:
                try:
                    self._torch = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # files from before torch 1.6's zip format cannot be memory-mapped
                    if "mmap" not in str(e):
                        raise
                    self._torch = torch.load(binary, map_location="cpu", weights_only=True)
            except Exception as e:  # anything but plain tensors (code to run, unknown classes) is refused
                raise ConversionError(f"{binary}: cannot be read with torch.load(weights_only=True) ({e})") from e
            self._files = {k: binary for k in self._torch}
            self._info = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.") if t.is_floating_point() else None)
                          for k, t in self._torch.items()}
        else:
            raise ConversionError(f"{self.folder}: no {single.name}, {index.name} or {binary.name} found")
        for path in dict.fromkeys(self._files.values()):  # each file's header once, in file order
            if self._torch is None:
                self._info.update(self._header(path))
        listed = set(self._files) - set(self._info)
        if listed:
            raise ConversionError(f"{index}: lists {sorted(listed)[:5]} but their files do not hold them")
        self._source = {(rename or str)(k): k for k in self._files}  # our name -> the checkpoint's
        self._files = {k: self._files[src] for k, src in self._source.items()}

    def _header(self, path: Path) -> dict[str, tuple[tuple[int, ...], str | None]]:
        from safetensors import safe_open

        if not path.exists():
            raise ConversionError(f"{path}: listed in the index but missing")
        try:
            with safe_open(str(path), framework="numpy") as f:
                return {k: (tuple(f.get_slice(k).get_shape()), self._FLOAT.get(f.get_slice(k).get_dtype()))
                        for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            raise ConversionError(f"{path}: cannot be read as safetensors ({e})") from e

    def keys(self) -> list[str]:
        """Every key, grouped by file in the files' order."""
        return sorted(self._files, key=lambda k: str(self._files[k]))

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def file(self, key: str) -> Path:
        return self._files[key]

    def info(self, key: str) -> tuple[tuple[int, ...], str | None]:
        """(shape, dtype name if floating point else None) from the header, without reading the data."""
        return self._info[self._source[key]]

    def get(self, key: str) -> np.ndarray:
        src = self._source[key]
        if self._torch is not None:
            t = self._torch[src]
            if str(t.dtype) == "torch.bfloat16":
                import ml_dtypes

                return t.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        from safetensors import safe_open

        try:
            with safe_open(str(self._files[key]), framework="numpy") as f:
                return f.get_tensor(src)
        except Exception as e:
            raise ConversionError(f"{self._files[key]}: tensor {key!r} cannot be read ({e})") from e


# ---------------------------------------------------------------------------------------------------------------
# Import


def flat_vars(state) -> dict[str, nnx.Variable]:
    """Our state as {"a/b/c": Variable}."""
    return {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def _expand(rule: Rule, num_layers: int | None) -> list[str]:
    if not rule.stacked:
        return [rule.hf]
    return [rule.key(i) for i in range(num_layers)]


def plan(rules: Iterable[Rule], abstract_state, reader_keys: Iterable[str] | None = None,
         ignore: Callable[[str], bool] = lambda k: False) -> list[tuple[Rule, str, tuple, object]]:
    """Matches rules to our parameters: (rule, path, our shape, dtype) for each parameter the model has.

    Raises if a parameter has no rule; with `reader_keys`, if a needed key is missing or a key is unused.
    """
    ours = flat_vars(abstract_state)
    by_path = {r.ours: r for r in rules}
    unmapped = sorted(set(ours) - set(by_path))
    if unmapped:
        raise ConversionError(f"no conversion rule for our parameters {unmapped}")
    out = []
    for path, var in ours.items():
        out.append((by_path[path], path, tuple(var.get_value().shape), var.get_value().dtype))
    if reader_keys is not None:
        have = set(reader_keys)
        needed = {k for rule, _, shape, _ in out for k in _expand(rule, shape[0] if rule.stacked else None)}
        missing = sorted(needed - have)
        if missing:
            raise ConversionError(f"missing keys in the checkpoint: {missing[:10]}"
                                  + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
        unexpected = sorted(k for k in have - needed if not ignore(k))
        if unexpected:
            raise ConversionError(f"unexpected keys in the checkpoint (not part of this model): {unexpected[:10]}"
                                  + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    return out


def _check_tensor(reader: TensorReader, key: str, want: tuple) -> None:
    got, dtype = reader.info(key)
    if tuple(got) != tuple(want):
        raise ConversionError(f"{key}: shape {tuple(got)} in the checkpoint, but the config needs {tuple(want)}")
    if dtype is None:
        raise ConversionError(f"{key}: not a floating-point tensor in the checkpoint")


@dataclasses.dataclass
class Source:
    """A HF checkpoint matched to our model: its reader, the key table, our abstract model (nnx.eval_shape) and
    which of its keys are not ours to convert."""

    reader: TensorReader
    rules: Sequence[Rule]
    model: nnx.Module
    ignore: Callable[[str], bool] = lambda k: False

    def entries(self) -> list[tuple[Rule, str, tuple, object]]:
        """`plan` against the checkpoint, every tensor's shape and type checked from the headers."""
        entries = plan(self.rules, nnx.state(self.model), self.reader.keys(), self.ignore)
        for rule, _, shape, _ in entries:
            hf_shape = rule.transform.hf_shape(shape[1:] if rule.stacked else shape)
            for key in _expand(rule, shape[0] if rule.stacked else None):
                _check_tensor(self.reader, key, hf_shape)
        return entries

    def dtype(self) -> str:
        """The checkpoint's parameter dtype: the widest floating dtype among the tensors we convert (no loss)."""
        keys = [k for rule, _, shape, _ in self.entries() for k in _expand(rule, shape[0] if rule.stacked else None)]
        dtypes = {self.reader.info(k)[1] for k in keys}
        widest = max(np.dtype(d).itemsize for d in dtypes)
        top = {d for d in dtypes if np.dtype(d).itemsize == widest}
        return top.pop() if len(top) == 1 else "float32"  # float16 beside bfloat16: neither holds the other


def load_state(source: Source, mesh=None):
    """Our model for `source`, in memory, placed by the rules on `mesh` (default: the first local device)."""
    graphdef, abs_state = nnx.split(source.model)
    entries, reader = source.entries(), source.reader
    if mesh is None:
        mesh = shd.make_mesh({"data": 1}, jax.local_devices()[:1])
    shardings = shd.state_shardings(abs_state, mesh)
    flat_sh = {p: v.get_value() for p, v in flat_vars(shardings).items()}
    values = {}
    for rule, path, shape, dtype in entries:
        layer_shape = shape[1:] if rule.stacked else shape

        def fetch(index, rule=rule, shape=shape, layer_shape=layer_shape, dtype=dtype):
            if not rule.stacked:
                return rule.transform.to_ours(reader.get(rule.hf), layer_shape).astype(dtype)[index]
            layers = range(shape[0])[index[0]]
            return np.stack([rule.transform.to_ours(reader.get(rule.key(i)), layer_shape).astype(dtype)
                             [index[1:]] for i in layers])

        values[path] = jax.make_array_from_callback(shape, flat_sh[path], fetch)
    flat = [(tuple(p.split("/")), v.replace(values[p])) for p, v in flat_vars(abs_state).items()]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------------------------------
# Export


@dataclasses.dataclass
class Layout:
    """How a model of ours is written in HF form: its key table, config.json and weight file name."""

    rules: Sequence[Rule]
    hf_config: dict[str, Any]
    file_prefix: str = "model"


def hf_slices(rules: Sequence[Rule], abstract_state):
    """(hf key, hf shape, rule, our path, layer or None) of every HF tensor of our parameters, in table order."""
    for rule, path, shape, _ in plan(rules, abstract_state):
        layer_shape = shape[1:] if rule.stacked else shape
        hf_shape = tuple(rule.transform.hf_shape(layer_shape))
        for i in range(shape[0]) if rule.stacked else (None,):
            yield (rule.hf if i is None else rule.key(i)), hf_shape, rule, path, i
