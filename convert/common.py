"""Machinery shared by the converters: key tables, tensor transforms, streaming safetensors in and out.

A converter is one table of `Rule(hf_key, our_path, transform)`; the same table serves both directions.
`{i}` in a rule marks a per-layer key stacked into the leading (layers) axis of our parameter; slice i of that
axis is HF layer `stride * i + offset` (1 and 0 unless layers alike only every few are stacked together).

Import streams: every parameter is built with `jax.make_array_from_callback`, whose callback reads, per device
shard, only the tensors that shard needs, straight from the memory-mapped files. Host memory stays at about one
tensor beyond the output, and each host of a pod reads only its own shards. Export streams the other way into
size-bounded safetensors shards plus an index, written into a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from genllava_jax import errors
from genllava_jax import sharding as shd
from genllava_jax.atomic import atomic_write


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
    """Keys, shapes and lazy tensors of a folder with `model.safetensors`, a sharded index, or a `.bin` file.

    `prefix` names the files (diffusers: "diffusion_pytorch_model"); `rename` maps the checkpoint's keys to the
    names the rules use (e.g. legacy names to current ones).
    """

    def __init__(self, folder: str | os.PathLike, prefix: str = "model", rename: Callable[[str], str] | None = None):
        self.folder = Path(folder)
        self._files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._torch: dict[str, object] | None = None
        index = self.folder / f"{prefix}.safetensors.index.json"
        single = self.folder / f"{prefix}.safetensors"
        binary = self.folder / ("pytorch_model.bin" if prefix == "model" else f"{prefix}.bin")
        if self.folder.is_file():  # a bare checkpoint file (e.g. a .pth state dict) rather than a folder
            single, binary = (self.folder, index) if self.folder.suffix == ".safetensors" else (index, self.folder)
        if index.exists():
            for key, fname in json.loads(index.read_text())["weight_map"].items():
                self._files[key] = self.folder / fname
        elif single.exists():
            self._files = {k: single for k in self._handle(single).keys()}
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
        else:
            raise ConversionError(f"{self.folder}: no {single.name}, {index.name} or {binary.name} found")
        self._source = {(rename or str)(k): k for k in self._files}  # our name -> the checkpoint's
        self._files = {k: self._files[src] for k, src in self._source.items()}

    def _handle(self, path: Path):
        if path not in self._open:
            from safetensors import safe_open

            if not path.exists():
                raise ConversionError(f"{path}: listed in the index but missing")
            try:
                self._open[path] = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
                raise ConversionError(f"{path}: cannot be read as safetensors ({e})") from e
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def info(self, key: str) -> tuple[tuple[int, ...], bool]:
        """(shape, is floating point) from the header, without reading the data."""
        src = self._source[key]
        if self._torch is not None:
            t = self._torch[src]
            return tuple(t.shape), t.is_floating_point()
        sl = self._handle(self._files[key]).get_slice(src)
        return tuple(sl.get_shape()), sl.get_dtype() in ("F16", "BF16", "F32", "F64")

    def get(self, key: str) -> np.ndarray:
        src = self._source[key]
        if self._torch is not None:
            t = self._torch[src]
            if str(t.dtype) == "torch.bfloat16":
                import ml_dtypes

                return t.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        try:
            return self._handle(self._files[key]).get_tensor(src)
        except ConversionError:
            raise
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
    got, is_float = reader.info(key)
    if tuple(got) != tuple(want):
        raise ConversionError(f"{key}: shape {tuple(got)} in the checkpoint, but the config needs {tuple(want)}")
    if not is_float:
        raise ConversionError(f"{key}: not a floating-point tensor in the checkpoint")


def load_state(reader: TensorReader, rules: Sequence[Rule], abstract_model: nnx.Module, mesh=None,
               ignore: Callable[[str], bool] = lambda k: False):
    """Our nnx state for `abstract_model` (from nnx.eval_shape) filled from `reader`, placed by the rules."""
    graphdef, abs_state = nnx.split(abstract_model)
    entries = plan(rules, abs_state, reader.keys(), ignore)
    if mesh is None:
        mesh = shd.make_mesh({"data": 1}, jax.local_devices()[:1])
    shardings = shd.state_shardings(abs_state, mesh)
    flat_sh = {p: v.get_value() for p, v in flat_vars(shardings).items()}
    values = {}
    for rule, path, shape, dtype in entries:
        layer_shape = shape[1:] if rule.stacked else shape
        hf_shape = rule.transform.hf_shape(layer_shape)
        for key in _expand(rule, shape[0] if rule.stacked else None):
            _check_tensor(reader, key, hf_shape)

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


def hf_tensors(module: nnx.Module, rules: Sequence[Rule], dtype=None):
    """Yields (hf_key, numpy tensor) one at a time from our module."""
    state = nnx.state(module, nnx.Param)
    for rule, path, shape, _ in plan(rules, state):
        a = np.asarray(jax.device_get(flat_vars(state)[path].get_value()))
        if dtype is not None:
            a = a.astype(dtype)
        layer_shape = shape[1:] if rule.stacked else shape
        hf_shape = rule.transform.hf_shape(layer_shape)
        # np.require, not ascontiguousarray: that turns a 0-d tensor (CLIP's logit_scale) into shape (1,)
        if rule.stacked:
            for i in range(shape[0]):
                yield rule.key(i), np.require(rule.transform.to_hf(a[i], hf_shape), requirements="C")
        else:
            yield rule.hf, np.require(rule.transform.to_hf(a, hf_shape), requirements="C")


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], folder: Path, prefix: str = "model",
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes size-bounded shards and, when there is more than one, `{prefix}.safetensors.index.json`."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    names: list[str] = []
    weight_map: dict[str, int] = {}
    size = total = 0

    def flush(last: bool):
        names.append(f"{prefix}-{len(names) + 1:05d}.safetensors")
        save_file(shards[-1], str(folder / names[-1]), metadata={"format": "pt"})
        if not last:
            shards[-1] = {}

    for key, t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            flush(last=False)
            size = 0
        shards[-1][key] = t
        weight_map[key] = len(names)
        size += t.nbytes
        total += t.nbytes
    flush(last=True)
    if len(names) == 1:
        os.replace(folder / names[0], folder / f"{prefix}.safetensors")
        return [f"{prefix}.safetensors"]
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def export_hf(path, hf_config: dict, tensors: Iterable[tuple[str, np.ndarray]], *, prefix: str = "model",
              dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """config.json + safetensors shards (+ index) written into a temporary directory renamed to `path` at the end;
    `dtype`, when the tensors were cast to it, is recorded as the config's torch_dtype."""
    if dtype is not None:
        hf_config = {**hf_config, "torch_dtype": str(dtype)}
    with atomic_write(path, directory=True, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_safetensors(tensors, tmp, prefix=prefix, max_shard_bytes=max_shard_bytes)
