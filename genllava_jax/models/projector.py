"""The vision-language projector of LLaVA-1.5: Linear -> GELU -> Linear from the vision width to the LLM width."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from genllava_jax.layers import Linear, gelu_exact
from genllava_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    vision_size: int = 1152
    text_size: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"

    def replace(self, **kw) -> "ProjectorConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ProjectorConfig":
        """From a LLaVA config (`mm_hidden_size`, `hidden_size`, `mm_projector_type`)."""
        kind = hf.get("mm_projector_type", "mlp2x_gelu")
        if kind != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type={kind!r} is not supported, only 'mlp2x_gelu'")
        for key in ("mm_hidden_size", "hidden_size"):
            if key not in hf:
                raise ValueError(f"the LLaVA config has no {key!r}")
        return cls(vision_size=hf["mm_hidden_size"], text_size=hf["hidden_size"], **overrides)

    def to_hf(self) -> dict[str, Any]:
        return {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": self.vision_size,
                "hidden_size": self.text_size, "torch_dtype": self.param_dtype}


class Projector(nnx.Module):
    def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.fc1 = Linear(cfg.vision_size, cfg.text_size, ("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.text_size, cfg.text_size, ("mlp", "embed"), **kw)

    def __call__(self, x_BTV: jax.Array) -> jax.Array:
        """(B, T, vision_size) patch features -> (B, T, text_size) LLM input embeddings."""
        h = constrain(gelu_exact(self.fc1(x_BTV)), ("batch", "length", "act_mlp"))
        return constrain(self.fc2(h), ("batch", "length", "act_embed"))
