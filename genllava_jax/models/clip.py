"""CLIP (Flax NNX), mirroring `transformers.CLIPModel`, `CLIPTextModel(WithProjection)`, `CLIPVisionModel(...)`.

Text tower: token + learned position embeddings, pre-LN layers under a causal (+ padding) mask, the final layer
norm, pooling at the EOS token (the highest id when `eos_token_id == 2`, as checkpoints saved before HF's PR #24773
do; else the first `eos_token_id`), `text_projection`. Vision tower: patch conv, class token, position embeddings
(bicubically resized for another patch grid, as HF's `interpolate_pos_encoding=True`), the pre-layernorm, layers,
post-layernorm of the class token, `visual_projection`. Layers are stacked and scanned under a named remat policy.
A model holds either tower or both (then also `logit_scale`, as CLIPModel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from genllava_jax.attention import Mask, attention
from genllava_jax.layers import ACTIVATIONS, Conv, Embed, LayerNorm, Linear, param, scan_layers, stack_layers
from genllava_jax.models.siglip import bicubic_matrix
from genllava_jax.sharding import constrain

LEGACY_EOS = 2  # an `eos_token_id` of 2 selects HF's legacy pooling: the position of the highest token id


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# HF's field names for ours, where they differ (the rest are the same)
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}


def _tower_from_hf(cls, hf: dict[str, Any]):
    fields = {f.name: hf.get(_HF_NAMES.get(f.name, f.name), f.default) for f in dataclasses.fields(cls)}
    if fields["hidden_size"] % fields["num_heads"]:
        raise ValueError(f"{hf.get('model_type', 'CLIP')}: hidden_size={fields['hidden_size']} is not divisible "
                         f"by num_attention_heads={fields['num_heads']}")
    if fields["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"hidden_act={fields['hidden_act']!r} is not supported; known: {sorted(ACTIVATIONS)}")
    for key in ("image_size", "patch_size"):
        if key in fields and not isinstance(fields[key], int):
            raise ValueError(f"{key}={fields[key]!r}: only square sizes (a single int) are supported")
    return cls(**fields)


def _tower_to_hf(cfg) -> dict[str, Any]:
    return {_HF_NAMES.get(k, k): v for k, v in dataclasses.asdict(cfg).items()} | {"attention_dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig | None = CLIPTextConfig()
    vision: CLIPVisionConfig | None = CLIPVisionConfig()
    projection_dim: int | None = 512  # None: no projections (a bare CLIPTextModel / CLIPVisionModel)
    logit_scale_init_value: float = 2.6592
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: str = "none"  # see layers.REMAT_POLICIES
    scan: bool = True
    attention: str = "auto"  # see genllava_jax.attention.BACKENDS

    def __post_init__(self):  # from a checkpoint's config.json the towers come as dicts
        for name, cls in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls(**getattr(self, name)))
        if self.text is None and self.vision is None:
            raise ValueError("a CLIP config needs a text tower, a vision tower or both")

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    @property
    def has_logit_scale(self) -> bool:
        return self.text is not None and self.vision is not None

    @property
    def hf_class(self) -> str:
        if self.has_logit_scale:
            return "CLIPModel"
        tower = "CLIPTextModel" if self.text is not None else "CLIPVisionModel"
        return tower + ("WithProjection" if self.projection_dim else "")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "CLIPConfig":
        """From a CLIPConfig, CLIPTextConfig or CLIPVisionConfig dict (a config.json), or a config holding one
        as `vision_config` (LLaVA); `projection_dim` only counts for the *WithProjection classes and CLIPModel."""
        kind = hf.get("model_type")
        archs = hf.get("architectures") or []
        if kind == "clip":
            text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
            return cls(_tower_from_hf(CLIPTextConfig, text), _tower_from_hf(CLIPVisionConfig, vision),
                       hf.get("projection_dim", 512), hf.get("logit_scale_init_value", 2.6592), **overrides)
        if kind not in ("clip_text_model", "clip_vision_model") and "vision_config" in hf:
            hf, archs = hf["vision_config"], []  # a composite model's CLIP vision tower (no projection)
            kind = hf.get("model_type")
        projection = hf.get("projection_dim", 512) if any(a.endswith("WithProjection") for a in archs) else None
        if kind == "clip_text_model":
            return cls(_tower_from_hf(CLIPTextConfig, hf), None, projection, **overrides)
        if kind == "clip_vision_model":
            return cls(None, _tower_from_hf(CLIPVisionConfig, hf), projection, **overrides)
        raise ValueError(f"model_type={kind!r} is not a CLIP config (clip, clip_text_model, clip_vision_model)")

    def to_hf(self) -> dict[str, Any]:
        common = {"architectures": [self.hf_class], "torch_dtype": self.param_dtype}
        if self.has_logit_scale:
            return common | {"model_type": "clip", "projection_dim": self.projection_dim,
                             "logit_scale_init_value": self.logit_scale_init_value,
                             "text_config": _tower_to_hf(self.text) | {"model_type": "clip_text_model"},
                             "vision_config": _tower_to_hf(self.vision) | {"model_type": "clip_vision_model"}}
        tower, kind = (self.text, "clip_text_model") if self.text is not None else (self.vision, "clip_vision_model")
        return common | _tower_to_hf(tower) | {"model_type": kind} | (
            {"projection_dim": self.projection_dim} if self.projection_dim else {})


# ---------------------------------------------------------------------------------------------------------------
# Layers (shared by both towers)


class Attention(nnx.Module):
    def __init__(self, tc, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        D, N = tc.hidden_size, tc.num_heads
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.q = Linear(D, (N, D // N), ("embed", "heads", "head_dim"), **kw)
        self.k = Linear(D, (N, D // N), ("embed", "heads", "head_dim"), **kw)
        self.v = Linear(D, (N, D // N), ("embed", "heads", "head_dim"), **kw)
        self.o = Linear((N, D // N), D, ("heads", "head_dim", "embed"), **kw)
        self.backend = cfg.attention

    def __call__(self, x_BTD, mask: Mask):
        names = ("batch", "length", "act_heads", None)
        q, k, v = (constrain(checkpoint_name(proj(x_BTD), name), names)
                   for proj, name in ((self.q, "q_proj"), (self.k, "k_proj"), (self.v, "v_proj")))
        return checkpoint_name(self.o(attention(q, k, v, mask, backend=self.backend)), "out_proj")


class MLP(nnx.Module):
    def __init__(self, tc, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.fc1 = Linear(tc.hidden_size, tc.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = Linear(tc.intermediate_size, tc.hidden_size, ("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[tc.hidden_act]

    def __call__(self, x):
        h = constrain(self.act(checkpoint_name(self.fc1(x), "mlp_in")), ("batch", "length", "act_mlp"))
        return checkpoint_name(self.fc2(h), "mlp_out")


class EncoderLayer(nnx.Module):
    def __init__(self, tc, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.norm1 = LayerNorm(tc.hidden_size, tc.layer_norm_eps, **kw)
        self.attn = Attention(tc, cfg, rngs=rngs)
        self.norm2 = LayerNorm(tc.hidden_size, tc.layer_norm_eps, **kw)
        self.mlp = MLP(tc, cfg, rngs=rngs)

    def __call__(self, x_BTD, mask: Mask):
        x_BTD = checkpoint_name(x_BTD, "layer_input")
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD), mask)
        return constrain(x_BTD + self.mlp(self.norm2(x_BTD)), ("batch", "length", "act_embed"))


def _encode(layers, x_BTD, mask: Mask, cfg: CLIPConfig):
    def body(layer, x, _):
        return layer(x, mask), None

    return scan_layers(layers, body, x_BTD, policy=cfg.remat, scan=cfg.scan)[0]


class TowerOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, T, D): after the final layer norm (text), before the post-layernorm (vision)
    pooler_output: jax.Array  # (B, D): the EOS state (text), the post-layernormed class token (vision)


class TextTower(nnx.Module):
    def __init__(self, tc: CLIPTextConfig, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.tc, self.cfg = tc, cfg
        self.token_embed = Embed(tc.vocab_size, tc.hidden_size, rngs=rngs, **kw)
        self.pos_embed = param(rngs, nnx.initializers.normal(0.01), (tc.max_position_embeddings, tc.hidden_size),
                               (None, "embed"), kw["param_dtype"])
        self.layers = stack_layers(lambda r: EncoderLayer(tc, cfg, rngs=r), tc.num_layers, rngs)
        self.final_norm = LayerNorm(tc.hidden_size, tc.layer_norm_eps, **kw)

    def __call__(self, input_ids_BT, attention_mask_BT=None) -> TowerOutput:
        B, T = input_ids_BT.shape
        if T > self.tc.max_position_embeddings:
            raise ValueError(f"CLIP text: {T} tokens > max_position_embeddings={self.tc.max_position_embeddings}")
        x = self.token_embed(input_ids_BT) + self.pos_embed[:T].astype(jnp.dtype(self.cfg.dtype))
        x = constrain(x, ("batch", "length", "act_embed"))
        mask = Mask(causal=True, q_valid_BT=attention_mask_BT, kv_valid_BS=attention_mask_BT)
        x = self.final_norm(_encode(self.layers, x, mask, self.cfg))
        ids = input_ids_BT.astype(jnp.int32)
        at_B = jnp.argmax(ids if self.tc.eos_token_id == LEGACY_EOS else ids == self.tc.eos_token_id, axis=-1)
        return TowerOutput(x, jnp.take_along_axis(x, at_B[:, None, None], axis=1)[:, 0])


class VisionTower(nnx.Module):
    def __init__(self, vc: CLIPVisionConfig, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        D = vc.hidden_size
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.vc, self.cfg = vc, cfg
        self.class_embed = param(rngs, nnx.initializers.normal(D ** -0.5), (D,), ("embed",), kw["param_dtype"])
        self.patch_embed = Conv(vc.num_channels, D, vc.patch_size, stride=vc.patch_size, use_bias=False, rngs=rngs,
                                **kw)
        self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (vc.grid ** 2 + 1, D), (None, "embed"),
                               kw["param_dtype"])
        self.pre_norm = LayerNorm(D, vc.layer_norm_eps, **kw)
        self.layers = stack_layers(lambda r: EncoderLayer(vc, cfg, rngs=r), vc.num_layers, rngs)
        self.post_norm = LayerNorm(D, vc.layer_norm_eps, **kw)

    def position_embeddings(self, gh: int, gw: int) -> jax.Array:
        """(1 + gh * gw, D): the class position, then the patch grid's, bicubically resized when it differs."""
        g = self.vc.grid
        pos = self.pos_embed[...].astype(jnp.dtype(self.cfg.dtype))
        if (gh, gw) == (g, g):
            return pos
        mh, mw = (jnp.asarray(bicubic_matrix(g, n), pos.dtype) for n in (gh, gw))
        grid = jnp.einsum("hi,wj,ijd->hwd", mh, mw, pos[1:].reshape(g, g, -1)).reshape(gh * gw, -1)
        return jnp.concatenate([pos[:1], grid])

    def __call__(self, pixel_values_BHWC) -> TowerOutput:
        x = self.patch_embed(pixel_values_BHWC)
        B, gh, gw, D = x.shape
        cls_B1D = jnp.broadcast_to(self.class_embed[...].astype(x.dtype), (B, 1, D))
        x = jnp.concatenate([cls_B1D, x.reshape(B, gh * gw, D)], axis=1) + self.position_embeddings(gh, gw)
        x = self.pre_norm(constrain(x, ("batch", "length", "act_embed")))
        x = _encode(self.layers, x, Mask(), self.cfg)
        return TowerOutput(x, self.post_norm(x[:, 0]))


class Output(NamedTuple):
    logits_per_image: jax.Array  # (B_img, B_text)
    logits_per_text: jax.Array  # (B_text, B_img)
    text_embeds: jax.Array  # (B_text, P), normalised
    image_embeds: jax.Array  # (B_img, P), normalised


class CLIP(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        P = cfg.projection_dim
        self.text = None if cfg.text is None else TextTower(cfg.text, cfg, rngs=rngs)
        self.vision = None if cfg.vision is None else VisionTower(cfg.vision, cfg, rngs=rngs)
        self.text_projection = (Linear(cfg.text.hidden_size, P, ("embed", None), **kw)
                                if cfg.text is not None and P else None)
        self.visual_projection = (Linear(cfg.vision.hidden_size, P, ("embed", None), **kw)
                                  if cfg.vision is not None and P else None)
        self.logit_scale = (param(rngs, nnx.initializers.constant(cfg.logit_scale_init_value), (), (),
                                  kw["param_dtype"]) if cfg.has_logit_scale else None)

    def _need(self, part: str):
        if getattr(self, part) is None:
            raise ValueError(f"this CLIP ({self.cfg.hf_class}) has no {part}")
        return getattr(self, part)

    def encode_text(self, input_ids_BT, attention_mask_BT=None) -> TowerOutput:
        """CLIPTextModel's outputs: SD's conditioning is `last_hidden_state`."""
        return self._need("text")(input_ids_BT, attention_mask_BT)

    def encode_image(self, pixel_values_BHWC) -> TowerOutput:
        return self._need("vision")(pixel_values_BHWC)

    def get_text_features(self, input_ids_BT, attention_mask_BT=None) -> jax.Array:
        """(B, P): the projected EOS state (unnormalised), as HF's get_text_features / text_embeds."""
        return self._need("text_projection")(self.encode_text(input_ids_BT, attention_mask_BT).pooler_output)

    def get_image_features(self, pixel_values_BHWC) -> jax.Array:
        """(B, P): the projected class token (unnormalised), as HF's get_image_features / image_embeds."""
        return self._need("visual_projection")(self.encode_image(pixel_values_BHWC).pooler_output)

    def __call__(self, input_ids_BT, pixel_values_BHWC, attention_mask_BT=None) -> Output:
        """CLIPModel's forward: cosine similarities scaled by exp(logit_scale)."""
        scale = jnp.exp(self._need("logit_scale")[...].astype(jnp.float32))
        norm = lambda e: e / jnp.linalg.norm(e.astype(jnp.float32), axis=-1, keepdims=True).astype(e.dtype)
        text = norm(self.get_text_features(input_ids_BT, attention_mask_BT))
        image = norm(self.get_image_features(pixel_values_BHWC))
        logits_per_text = (text @ image.T).astype(jnp.float32) * scale
        return Output(logits_per_text.T, logits_per_text, text, image)
