"""The device mesh, the logical-axis rules, and building models already sharded.

Parameters and activations name their axes logically ("embed", "heads", "batch", ...); one rules table maps those
names to the mesh axes ("data", "fsdp", "tensor"). A mesh axis that does not divide a dimension, or is already used
by an earlier dimension of the same array, is dropped for that array (e.g. 8 KV heads on tensor=16 stay
replicated) so every rule is valid for every model size. What was dropped is not silent: `sharding_report` tables
each parameter group's spec, what stayed replicated over which axis and why, and bytes per device (the train CLI
and the fit check print it); `strict=True` (config `strict_sharding`) makes a dropped axis an error.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from genllava_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("lora", None),  # the rank axis of LoRA factors (genllava_jax.lora); their other axes are the kernel's
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_rules: list[tuple[tuple[str, Any], ...]] = [DEFAULT_RULES]


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, Any]]):
    """Use another rules table for `constrain` and the sharding helpers inside this block."""
    _rules.append(tuple(rules))
    try:
        yield
    finally:
        _rules.pop()


def current_rules() -> tuple[tuple[str, Any], ...]:
    return _rules[-1]


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) in that order; one size may be -1 to take the remaining devices."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise errors.BadValue(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise errors.BadValue(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise errors.BadValue(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) do not divide the "
                                  f"{len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise errors.BadValue(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} slots but there are "
                              f"{len(devices)} devices; set one axis to -1 or make the product {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None, dropped: list[str] | None = None) -> P:
    """PartitionSpec for logical axis names; with shape and mesh, drops axes that do not divide or repeat. Each
    mesh axis (of size > 1) dropped because it does not divide is described in `dropped`, when given."""
    table = dict(current_rules() if rules is None else rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        target = table.get(name) if name is not None else None
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        kept = []
        for axis in targets:
            if axis in used:
                continue
            if mesh is not None and shape is not None:
                size = mesh.shape[axis]
                if size == 1:
                    continue
                if shape[i] % (size * math.prod(mesh.shape[a] for a in kept)):
                    if dropped is not None:
                        dropped.append(f"{axis}={size} does not divide {name}={shape[i]}")
                    continue
            kept.append(axis)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, mesh: Mesh, rules=None, strict: bool = False):
    """NamedShardings for an (abstract) nnx state, from each Variable's `out_sharding` logical names. `strict`: a
    mesh axis that does not divide a dimension it is ruled to shard is an error naming the parameter."""
    problems = []

    def one(path, v):
        names = v.get_metadata().get("out_sharding")
        shape = v.get_value().shape
        dropped = []
        spec = P() if not names else logical_to_spec(names, shape, mesh, rules, dropped)
        problems.extend(f"{_name(path)} {tuple(shape)}: {d}" for d in dropped)
        return v.replace(NamedSharding(mesh, spec))

    out = jax.tree.map_with_path(one, abstract_state, is_leaf=_is_var)
    if strict and problems:
        raise errors.BadValue(f"strict_sharding: {len(problems)} parameters would be replicated over a mesh axis that "
                              f"does not divide them: {'; '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}. "
                              f"Change the mesh, or set strict_sharding=False to replicate them")
    return out


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def sharding_report(abstract_state, mesh: Mesh, rules=None) -> tuple[str, list[str]]:
    """(a table of each parameter group (part, logical axes, spec) with its arrays, bytes per device and what stayed
    replicated and why; the dropped axes, one line each)."""
    groups: dict[tuple, list] = {}
    dropped_all = []
    for path, v in nnx.to_flat_state(abstract_state):
        names = v.get_metadata().get("out_sharding")
        shape, dtype = v.get_value().shape, v.get_value().dtype
        dropped = []
        spec = P() if not names else logical_to_spec(names, shape, mesh, rules, dropped)
        per_device = math.prod(NamedSharding(mesh, spec).shard_shape(shape)) * dtype.itemsize
        g = groups.setdefault((str(path[0]), tuple(names or ()), spec), [0, 0, 0, set()])
        g[0] += 1
        g[1] += per_device
        g[2] += math.prod(shape) * dtype.itemsize
        g[3].update(dropped)
        dropped_all += [f"{_name(path)} {tuple(shape)}: {d}" for d in dropped]
    mesh_desc = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [f"parameter shardings on mesh {mesh_desc}:",
             f"  {'part':10s} {'logical axes':42s} {'mesh spec':34s} {'arrays':>6s} {'per device':>10s} "
             f"{'whole':>10s}  replicated over"]
    for (part, names, spec), (n, dev, full, why) in sorted(groups.items(), key=lambda kv: str(kv[0])):
        lines.append(f"  {part:10s} {str(names):42s} {str(tuple(spec)):34s} {n:6d} {_bytes(dev):>10s} "
                     f"{_bytes(full):>10s}  {'; '.join(sorted(why))}")
    total = sum(g[1] for g in groups.values())
    lines.append(f"  {len(dropped_all)} arrays keep a dimension unsplit over an axis that does not divide it; "
                 f"{_bytes(total)} of parameters per device")
    return "\n".join(lines), dropped_all


def _bytes(n: float) -> str:
    unit = next((u for u in ("GiB", "MiB", "KiB") if n >= 2 ** {"GiB": 30, "MiB": 20, "KiB": 10}[u]), "B")
    return f"{n / 2 ** {'GiB': 30, 'MiB': 20, 'KiB': 10, 'B': 0}[unit]:.1f} {unit}"


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs of an abstract pytree, each carrying its sharding: what orbax restores into and what an AOT
    compile takes."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_shardings(batch, mesh: Mesh):
    """A batch's leading axis over ("batch" = data × fsdp), the rest replicated."""
    return jax.tree.map(lambda x: NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape,
                                                                      mesh)), batch)


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh, rules=None, strict: bool = False) -> nnx.Module:
    """Builds `ctor()` directly in its shardings: nothing full-size ever lives on one device."""
    abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules, strict)

    # runs once: XLA's backend optimisations only slow the compile of hundreds of RNG ops down (2-3x on CPU)
    init = jax.jit(lambda: nnx.state(ctor()), out_shardings=shardings).lower()
    state = init.compile(compiler_options={"xla_backend_optimization_level": 0})()
    return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Moves an existing module's parameters onto the mesh according to the rules."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
