"""LoRA (Hu et al. 2021) as a training option: low-rank factors beside the kernels of chosen `Linear` layers.

    y = x @ W + (dropout(x) @ A) @ B · alpha / rank        A: (in..., rank), B: (rank, out...), B starts at zero

Config `train.lora` maps a part (`llm`, `vision`, `head`, ...) to its `LoRAConfig`; `targets` are regexes that must
match the whole path of a Linear inside the part (`layers/q`, `layers/gate`, `lm_head`, ...). A and B are
`LoRAParam`s created beside the kernel, with its leading stacked-layers axis and its logical axis names (the rank
axis is `lora`, replicated), so they shard by the same rules and run in the same scan. The kernel (and bias) of an
adapted Linear is frozen (`adapted`); the factors always train. `merge` folds them into the kernels (what
inference and export use); `convert/lora.py` writes and reads PEFT adapters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from genllava_jax.errors import BadValue
from genllava_jax.layers import Linear


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0  # 0: no LoRA on this part
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training steps only
    targets: tuple[str, ...] = ("layers/.*",)  # regexes over the Linear paths inside the part (whole match)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            bad.append(f"rank={self.rank!r} must be an integer >= 0")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            bad.append(f"alpha={self.alpha!r} must be a finite number > 0")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            bad.append(f"dropout={self.dropout!r} must be in [0, 1)")
        for t in self.targets:
            try:
                re.compile(t)
            except (re.error, TypeError) as e:
                bad.append(f"targets: {t!r} is not a regex ({e})")
        if bad:
            raise BadValue("; ".join(bad))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def configs(section) -> dict[str, LoRAConfig]:
    """{part: LoRAConfig} of config `train.lora` (a ConfigDict or dict), the parts with rank > 0 only."""
    out = {}
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    for part, fields in section.items():
        fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
        try:
            cfg = LoRAConfig(**fields)
        except (TypeError, BadValue) as e:
            raise BadValue(f"train.lora.{part}: {e}") from e
        if cfg.rank:
            out[part] = cfg
    return out


class LoRAParam(nnx.Param):
    """A LoRA factor: always trained, while the kernel it adapts stays frozen."""


class DropoutKey(nnx.Variable):
    """The keys of a LoRA's input dropout (one per stacked layer), set inside a training step only."""


class LoRA(nnx.Module):
    """The factors of one Linear, shaped and named like its kernel (lead..., in..., out...): A is
    (lead..., in..., rank), B (lead..., rank, out...)."""

    def __init__(self, linear: Linear, cfg: LoRAConfig, rngs: nnx.Rngs | None):
        kernel = linear.kernel
        shape, names = kernel.get_value().shape, kernel.get_metadata()["out_sharding"]
        n_in, n_out = len(linear.in_shape), len(linear.out_shape)
        lead = len(shape) - n_in - n_out  # the stacked-layers axis, when the Linear lives in a scanned stack
        a_shape = shape[:lead + n_in] + (cfg.rank,)
        b_shape = shape[:lead] + (cfg.rank,) + shape[lead + n_in:]
        # PEFT's init: A kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(fan_in)); B zero, so training starts at W
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(lead, lead + n_in)),
                                                 out_axis=-1, batch_axis=tuple(range(lead)))
        key = rngs.params() if rngs is not None else jax.random.key(0)
        dtype = kernel.get_value().dtype
        self.a = LoRAParam(init(key, a_shape, dtype), out_sharding=tuple(names[:lead + n_in]) + ("lora",),
                           eager_sharding=False)
        self.b = LoRAParam(jnp.zeros(b_shape, dtype), out_sharding=tuple(names[:lead]) + ("lora",) +
                           tuple(names[lead + n_in:]), eager_sharding=False)
        self.rank, self.scale, self.dropout, self.n_in, self.lead = cfg.rank, cfg.scale, cfg.dropout, n_in, lead
        self.dtype = linear.dtype
        self.key = nnx.data(None)  # DropoutKey while a training step runs

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.dropout and self.key is not None:
            keep = jax.random.bernoulli(self.key[...], 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(self.dtype)
        n = self.n_in
        h = jax.lax.dot_general(x, self.a[...].astype(self.dtype),
                                ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
        h = h * jnp.asarray(self.scale, self.dtype)  # on the rank-wide activation: the cheapest place
        return jax.lax.dot_general(h, self.b[...].astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))

    def delta(self) -> jax.Array:
        """scale · A @ B in the kernel's layout, in float32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        lead = a.shape[:self.lead]
        a2 = a.reshape(lead + (-1, self.rank))
        b2 = b.reshape(lead + (self.rank, -1))
        return (self.scale * (a2 @ b2)).reshape(a.shape[:-1] + b.shape[self.lead + 1:])


# ---------------------------------------------------------------------------------------------------------------
# Adding, finding, merging


def linears(module: nnx.Module) -> dict[str, Linear]:
    """{"/"-joined path: Linear} of every Linear inside `module`."""
    return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(module) if isinstance(m, Linear)}


def add(module: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs | None, paths: Iterable[str] | None = None,
        where: str = "lora") -> nnx.Module:
    """Adds LoRA factors to the Linears of `module` whose path `cfg.targets` matches (or to exactly `paths`); in
    place, and returns the module. Targets that match no Linear are an error listing the Linears there are."""
    found = linears(module)
    if paths is None:
        regexes = [re.compile(t) for t in cfg.targets]
        paths = [p for p in found if any(r.fullmatch(p) for r in regexes)]
        if not paths:
            raise BadValue(f"{where}.targets={list(cfg.targets)} match no linear layer; its linear layers are "
                           f"{sorted(found)}")
    for p in paths:
        if found[p].lora is not None:
            raise BadValue(f"{where}: {p} has LoRA factors already")
        found[p].lora = LoRA(found[p], cfg, rngs)
    return module


def apply(model: nnx.Module, cfgs: Mapping[str, LoRAConfig], rngs: nnx.Rngs | None) -> nnx.Module:
    """Adds each part's LoRA (config `train.lora`, as `configs` reads it) to `model`; in place, returns it."""
    for part, cfg in cfgs.items():
        sub = getattr(model, part, None)
        if not isinstance(sub, nnx.Module):
            raise BadValue(f"train.lora.{part}: the model has no part {part!r}")
        add(sub, cfg, rngs, where=f"train.lora.{part}")
    return model


def adapted(module: nnx.Module) -> dict[str, LoRA]:
    """{"/"-joined path of a Linear: its LoRA} of every adapted Linear inside `module`."""
    return {p: m.lora for p, m in linears(module).items() if m.lora is not None}


def frozen_paths(module: nnx.Module) -> set[str]:
    """The parameters LoRA freezes: the kernel and bias of every adapted Linear ("/"-joined paths)."""
    return {f"{p}/{name}" for p, lin in linears(module).items() if lin.lora is not None
            for name in ("kernel", "bias") if getattr(lin, name) is not None}


def merge(module: nnx.Module) -> nnx.Module:
    """Folds every LoRA into its kernel (W + scale · A @ B, computed in float32, stored in the kernel's dtype and
    sharding) and removes the factors; in place, returns the module."""
    for lin in linears(module).values():
        if lin.lora is None:
            continue
        k = lin.kernel.get_value()
        graphdef, state = nnx.split(lin.lora)
        fold = jax.jit(lambda k, s: (k.astype(jnp.float32) + nnx.merge(graphdef, s).delta()).astype(k.dtype),
                       out_shardings=getattr(k, "sharding", None))
        lin.kernel.set_value(fold(k, state))
        lin.lora = None
    return module


def strip(module: nnx.Module) -> nnx.Module:
    """Removes every LoRA (the base model as it was before training); in place, returns the module."""
    for lin in linears(module).values():
        lin.lora = None
    return module


def set_dropout_keys(module: nnx.Module, rng: jax.Array) -> None:
    """Gives each LoRA with dropout its own keys (one per stacked layer) for this forward: a training step calls it
    on the model it merged, so evaluation and inference run without dropout."""
    for i, lora in enumerate(adapted(module).values()):
        if lora.dropout:
            lead = lora.a.get_value().shape[:lora.lead]
            keys = jax.random.split(jax.random.fold_in(rng, i), math.prod(lead))
            lora.key = DropoutKey(keys.reshape(lead + keys.shape[1:]))
