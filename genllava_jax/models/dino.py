"""A ViT in `transformers.ViTModel`'s layout, for DINO ViT-S/16 (`facebook/dino-vits16`), whose [CLS] feature is
the DINO score's image embedding.

Patch embedding (a conv with bias), a [CLS] token, learned position embeddings (bicubically resized when asked, as
HF's `interpolate_pos_encoding=True`), pre-LN encoder layers (SigLIP's, scanned under a remat policy), the final
layernorm and HF's optional pooler (dense + tanh on [CLS]). `__call__` returns ViTModel's last_hidden_state and
pooler_output; `features` the DINO embedding (last_hidden_state[:, 0]).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from genllava_jax.layers import ACTIVATIONS, Conv, LayerNorm, Linear, param, scan_layers, stack_layers
from genllava_jax.models.siglip import EncoderLayer, bicubic_matrix
from genllava_jax.sharding import constrain

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ViTImageProcessor's, DINO's


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Defaults: DINO ViT-S/16. The field names are SigLIP's, whose encoder layer this reuses."""

    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 12
    num_heads: int = 6
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    use_pooler: bool = True  # ViTModel's add_pooling_layer
    pooler_act: str = "tanh"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = True
    attention: str = "auto"  # see genllava_jax.attention.BACKENDS

    def replace(self, **kw) -> "ViTConfig":
        return dataclasses.replace(self, **kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ViTConfig":
        """From a transformers ViTConfig dict (HF's defaults fill what it leaves out)."""
        if hf.get("model_type", "vit") != "vit":
            raise ValueError(f"model_type={hf['model_type']!r} is not a ViT config")
        for key in ("image_size", "patch_size"):
            if not isinstance(hf.get(key, 0), int):
                raise ValueError(f"{key}={hf[key]!r}: only square sizes (a single int) are supported")
        if not hf.get("qkv_bias", True):
            raise ValueError("qkv_bias=False is not supported (ViT and DINO have q/k/v biases)")
        if hf.get("pooler_output_size") not in (None, hf.get("hidden_size", 768)):
            raise ValueError(f"pooler_output_size={hf['pooler_output_size']} != hidden_size is not supported")
        for key, default in (("hidden_act", "gelu"), ("pooler_act", "tanh")):
            if hf.get(key, default) not in ACTIVATIONS:
                raise ValueError(f"{key}={hf[key]!r} is not supported; known: {sorted(ACTIVATIONS)}")
        if hf.get("hidden_size", 768) % hf.get("num_attention_heads", 12):
            raise ValueError(f"hidden_size={hf['hidden_size']} is not divisible by num_attention_heads")
        fields = dict(hidden_size=hf.get("hidden_size", 768), intermediate_size=hf.get("intermediate_size", 3072),
                      num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
                      num_channels=hf.get("num_channels", 3), image_size=hf.get("image_size", 224),
                      patch_size=hf.get("patch_size", 16), hidden_act=hf.get("hidden_act", "gelu"),
                      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pooler_act=hf.get("pooler_act", "tanh"))
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_channels": self.num_channels,
                "image_size": self.image_size, "patch_size": self.patch_size, "hidden_act": self.hidden_act,
                "layer_norm_eps": self.layer_norm_eps, "qkv_bias": True, "pooler_act": self.pooler_act,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "torch_dtype": self.param_dtype}


class Output(NamedTuple):
    last_hidden_state: jax.Array  # (B, 1 + patches, D) after the final layernorm
    pooler_output: jax.Array | None  # (B, D): tanh(dense([CLS])), None without the pooler


class DinoViT(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.hidden_size
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.patch_embed = Conv(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size, rngs=rngs, **kw)
        self.cls_token = param(rngs, nnx.initializers.normal(0.02), (1, 1, D), (None, None, "embed"),
                               kw["param_dtype"])
        self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (1, 1 + cfg.grid ** 2, D), (None, None, "embed"),
                               kw["param_dtype"])
        self.layers = stack_layers(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = LayerNorm(D, cfg.layer_norm_eps, **kw)
        self.pooler = Linear(D, D, ("embed", "mlp"), use_bias=True, rngs=rngs, **kw) if cfg.use_pooler else None

    def position_embeddings(self, gh: int, gw: int, interpolate: bool) -> jax.Array:
        """(1, 1 + gh * gw, D); the patch part bicubically resized from the trained grid. (HF skips the resize for
        a square image of the trained patch count; a resize to the same grid is the identity anyway.)"""
        g, pos = self.cfg.grid, self.pos_embed[...].astype(jnp.dtype(self.cfg.dtype))
        if (gh, gw) == (g, g):
            return pos
        if not interpolate:
            raise ValueError(f"input of {gh}x{gw} patches does not match the model's {g}x{g}; pass "
                             f"interpolate_pos_encoding=True")
        mh, mw = (jnp.asarray(bicubic_matrix(g, n), pos.dtype) for n in (gh, gw))
        patch = jnp.einsum("hi,wj,ijd->hwd", mh, mw, pos[0, 1:].reshape(g, g, -1)).reshape(1, gh * gw, -1)
        return jnp.concatenate([pos[:, :1], patch], axis=1)

    def __call__(self, pixel_values_BHWC: jax.Array, interpolate_pos_encoding: bool = False) -> Output:
        x = self.patch_embed(pixel_values_BHWC)
        B, gh, gw, D = x.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (B, 1, D))
        x = jnp.concatenate([cls, x.reshape(B, gh * gw, D)], axis=1)
        x = x + self.position_embeddings(gh, gw, interpolate_pos_encoding)
        x = constrain(x, ("batch", "length", "act_embed"))
        x, _ = scan_layers(self.layers, lambda layer, x, _: (layer(x), None), x, jnp.arange(self.cfg.num_layers),
                           policy=self.cfg.remat, scan=self.cfg.scan)
        x = self.norm(x)
        pooled = None if self.pooler is None else ACTIVATIONS[self.cfg.pooler_act](self.pooler(x[:, 0]))
        return Output(x, pooled)

    def features(self, pixel_values_BHWC: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        """(B, D): the [CLS] token of the last hidden state, the DINO score's embedding."""
        return self(pixel_values_BHWC, interpolate_pos_encoding).last_hidden_state[:, 0]
