"""Stable Diffusion UNet (Flax NNX, NHWC), mirroring `diffusers.UNet2DConditionModel` for the SD 1.x / 2.x families.

Sinusoidal time embedding + MLP, conv_in, down blocks (ResNet blocks, optional cross-attention transformers,
strided-conv downsampling), a cross-attention mid block, up blocks with skip connections and nearest-neighbour
upsampling, GroupNorm + SiLU + conv_out. Module names mirror diffusers' so that the converter maps keys by path.
Blocks differ in shape, so they are plain Python loops (no scan); each runs under the config's remat policy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from genllava_jax.attention import attention
from genllava_jax.layers import ACTIVATIONS, Conv, GroupNorm, LayerNorm, Linear, remat
from genllava_jax.models.sd_blocks import Downsample, ResnetBlock, Upsample, as_tuple, constrain_images, dtype_kw
from genllava_jax.sharding import constrain

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# diffusers options this model does not implement, with the values that mean "off"
_OFF = {"class_embed_type": (None,), "addition_embed_type": (None,), "time_cond_proj_dim": (None,),
        "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_class_embeds": (None,),
        "num_attention_heads": (None,), "dual_cross_attention": (False,), "only_cross_attention": (False,),
        "mid_block_only_cross_attention": (None, False), "resnet_time_scale_shift": ("default",),
        "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0), "time_embedding_type": ("positional",),
        "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
        "attention_type": ("default",), "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",), "reverse_transformer_layers_per_block": (None,),
        "addition_time_embed_dim": (None,), "projection_class_embeddings_input_dim": (None,), "dropout": (0, 0.0)}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Defaults: Stable Diffusion v1.4."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    heads: tuple[int, ...] = (8, 8, 8, 8)  # per down block; diffusers calls this attention_head_dim (sic)
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False  # attention softmax is always float32 here
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # per block; see layers.REMAT_POLICIES
    attention: str = "auto"  # see genllava_jax.attention.BACKENDS

    def __post_init__(self):  # lists from JSON back to (hashable) tuples
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, as_tuple(getattr(self, f.name)))
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == len(self.heads) == n):
            raise ValueError(f"UNetConfig: {n} block_out_channels but {len(self.down_block_types)} down blocks, "
                             f"{len(self.up_block_types)} up blocks and {len(self.heads)} head counts")
        bad = [t for t in self.down_block_types if t not in DOWN_TYPES] + \
              [t for t in self.up_block_types if t not in UP_TYPES]
        if bad:
            raise ValueError(f"unsupported block types {bad}; supported: {DOWN_TYPES + UP_TYPES}")

    def replace(self, **kw) -> "UNetConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "UNetConfig":
        for key, off in _OFF.items():
            v = hf.get(key, off[0])
            if any(x not in off for x in (v if isinstance(v, list) else [v])):
                raise ValueError(f"UNet config: {key}={v!r} is not supported (only {off[0]!r})")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            if isinstance(hf.get(key), list):
                raise ValueError(f"UNet config: per-block {key}={hf[key]!r} is not supported, only one int")
        if hf.get("norm_num_groups", 32) is None:
            raise ValueError("UNet config: norm_num_groups=None is not supported")
        n = len(hf["block_out_channels"])
        heads = hf.get("attention_head_dim", 8)
        size = hf.get("sample_size", 64)
        return cls(
            sample_size=size[0] if isinstance(size, list) else size, in_channels=hf.get("in_channels", 4),
            out_channels=hf.get("out_channels", 4), center_input_sample=hf.get("center_input_sample", False),
            flip_sin_to_cos=hf.get("flip_sin_to_cos", True), freq_shift=hf.get("freq_shift", 0),
            down_block_types=hf["down_block_types"], up_block_types=hf["up_block_types"],
            block_out_channels=hf["block_out_channels"], layers_per_block=hf.get("layers_per_block", 2),
            downsample_padding=hf.get("downsample_padding", 1),
            mid_block_scale_factor=float(hf.get("mid_block_scale_factor", 1)), act_fn=hf.get("act_fn", "silu"),
            norm_num_groups=hf.get("norm_num_groups", 32), norm_eps=hf.get("norm_eps", 1e-5),
            cross_attention_dim=hf.get("cross_attention_dim", 1280),
            heads=tuple(heads) if isinstance(heads, list) else (heads,) * n,
            transformer_layers_per_block=hf.get("transformer_layers_per_block", 1),
            use_linear_projection=hf.get("use_linear_projection", False),
            upcast_attention=bool(hf.get("upcast_attention", False)),
            conv_in_kernel=hf.get("conv_in_kernel", 3), conv_out_kernel=hf.get("conv_out_kernel", 3), **overrides)

    def to_hf(self) -> dict[str, Any]:
        return {
            "_class_name": "UNet2DConditionModel", "sample_size": self.sample_size,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample, "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift, "down_block_types": list(self.down_block_types),
            "mid_block_type": "UNetMidBlock2DCrossAttn", "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "downsample_padding": self.downsample_padding, "mid_block_scale_factor": self.mid_block_scale_factor,
            "act_fn": self.act_fn, "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": self.heads[0] if len(set(self.heads)) == 1 else list(self.heads),
            "transformer_layers_per_block": self.transformer_layers_per_block,
            "use_linear_projection": self.use_linear_projection, "upcast_attention": self.upcast_attention,
            "conv_in_kernel": self.conv_in_kernel, "conv_out_kernel": self.conv_out_kernel,
        }


# ---------------------------------------------------------------------------------------------------------------
# Attention (self- or cross-)


class Attention(nnx.Module):
    """Multi-head attention of diffusers' `Attention` (self- or cross-); q/k/v biases only where the model has them."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, *, bias: bool = False,
                 backend: str = "xla", rngs: nnx.Rngs, **kw):
        ctx = context_dim or dim
        self.backend = backend
        self.to_q = Linear(dim, (heads, head_dim), ("embed", "heads", "head_dim"), use_bias=bias, rngs=rngs, **kw)
        self.to_k = Linear(ctx, (heads, head_dim), ("embed", "heads", "head_dim"), use_bias=bias, rngs=rngs, **kw)
        self.to_v = Linear(ctx, (heads, head_dim), ("embed", "heads", "head_dim"), use_bias=bias, rngs=rngs, **kw)
        self.to_out = Linear((heads, head_dim), dim, ("heads", "head_dim", "embed"), use_bias=True, rngs=rngs, **kw)

    def __call__(self, x_BTD, context_BSD=None):
        ctx = x_BTD if context_BSD is None else context_BSD
        names = ("batch", "length", "act_heads", None)
        q, k, v = (constrain(checkpoint_name(p(a), name), names) for p, a, name in
                   ((self.to_q, x_BTD, "q_proj"), (self.to_k, ctx, "k_proj"), (self.to_v, ctx, "v_proj")))
        return checkpoint_name(self.to_out(attention(q, k, v, backend=self.backend)), "out_proj")


# ---------------------------------------------------------------------------------------------------------------
# Cross-attention transformer


class TransformerBlock(nnx.Module):
    """diffusers' BasicTransformerBlock: pre-LayerNorm self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *, backend: str, rngs: nnx.Rngs,
                 **kw):
        self.norm1 = LayerNorm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads, head_dim, backend=backend, rngs=rngs, **kw)
        self.norm2 = LayerNorm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, backend=backend, rngs=rngs, **kw)
        self.norm3 = LayerNorm(dim, 1e-5, **kw)
        # GEGLU's projection as (dim, 2, 4 dim): [..., 0, :] is the value, [..., 1, :] the gate (torch's chunk order)
        self.ff_in = Linear(dim, (2, 4 * dim), ("embed", None, "mlp"), use_bias=True, rngs=rngs, **kw)
        self.ff_out = Linear(4 * dim, dim, ("mlp", "embed"), use_bias=True, rngs=rngs, **kw)

    def __call__(self, x_BTD, context_BSD):
        x_BTD = checkpoint_name(x_BTD, "layer_input")
        x_BTD = x_BTD + self.attn1(self.norm1(x_BTD))
        x_BTD = x_BTD + self.attn2(self.norm2(x_BTD), context_BSD)
        h = checkpoint_name(self.ff_in(self.norm3(x_BTD)), "mlp_in")
        h_BTF = constrain(h[..., 0, :] * jax.nn.gelu(h[..., 1, :], approximate=False), ("batch", "length", "act_mlp"))
        return x_BTD + checkpoint_name(self.ff_out(h_BTF), "mlp_out")


class Transformer2D(nnx.Module):
    """diffusers' Transformer2DModel on continuous inputs: GroupNorm, proj_in (1x1 conv or linear), blocks, proj_out,
    residual."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        kw = dtype_kw(cfg)
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = GroupNorm(cfg.norm_num_groups, channels, 1e-6, **kw)
        if cfg.use_linear_projection:
            self.proj_in = Linear(channels, inner, ("conv_in", "conv_out"), use_bias=True, rngs=rngs, **kw)
            self.proj_out = Linear(inner, channels, ("conv_in", "conv_out"), use_bias=True, rngs=rngs, **kw)
        else:
            self.proj_in = Conv(channels, inner, 1, rngs=rngs, **kw)
            self.proj_out = Conv(inner, channels, 1, rngs=rngs, **kw)
        self.transformer_blocks = nnx.List([TransformerBlock(inner, heads, head_dim, cfg.cross_attention_dim,
                                                             backend=cfg.attention, rngs=rngs, **kw)
                                            for _ in range(cfg.transformer_layers_per_block)])

    def __call__(self, x_NHWC, context_BSD):
        B, H, W, _ = x_NHWC.shape
        h = self.proj_in(self.norm(x_NHWC))  # a 1x1 conv and a linear are the same map on NHWC
        h_BTD = constrain(h.reshape(B, H * W, h.shape[-1]), ("batch", "length", "act_embed"))
        for block in self.transformer_blocks:
            h_BTD = block(h_BTD, context_BSD)
        return x_NHWC + self.proj_out(h_BTD.reshape(B, H, W, -1))


# ---------------------------------------------------------------------------------------------------------------
# UNet blocks


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D; returns (x, the skip activations it adds)."""

    def __init__(self, cfg: UNetConfig, i: int, c_in: int, temb: int, *, rngs: nnx.Rngs):
        c_out, kw = cfg.block_out_channels[i], dtype_kw(cfg)
        res = dict(temb=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act=cfg.act_fn, rngs=rngs, **kw)
        n = cfg.layers_per_block
        self.resnets = nnx.List([ResnetBlock(c_in if j == 0 else c_out, c_out, **res) for j in range(n)])
        cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        self.attentions = nnx.List([Transformer2D(c_out, cfg.heads[i], cfg, rngs=rngs) for _ in range(n)]) \
            if cross else None
        final = i == len(cfg.block_out_channels) - 1
        self.downsample = None if final else Downsample(c_out, cfg.downsample_padding, rngs=rngs, **kw)

    def __call__(self, x_NHWC, temb_BE, context_BSD):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x_NHWC = resnet(x_NHWC, temb_BE)
            if self.attentions is not None:
                x_NHWC = self.attentions[j](x_NHWC, context_BSD)
            skips.append(x_NHWC)
        if self.downsample is not None:
            x_NHWC = self.downsample(x_NHWC)
            skips.append(x_NHWC)
        return constrain_images(x_NHWC), tuple(skips)


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig, temb: int, *, rngs: nnx.Rngs):
        c = cfg.block_out_channels[-1]
        res = dict(temb=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act=cfg.act_fn,
                   output_scale=cfg.mid_block_scale_factor, rngs=rngs, **dtype_kw(cfg))
        self.resnets = nnx.List([ResnetBlock(c, c, **res), ResnetBlock(c, c, **res)])
        self.attentions = nnx.List([Transformer2D(c, cfg.heads[-1], cfg, rngs=rngs)])

    def __call__(self, x_NHWC, temb_BE, context_BSD):
        x_NHWC = self.attentions[0](self.resnets[0](x_NHWC, temb_BE), context_BSD)
        return constrain_images(self.resnets[1](x_NHWC, temb_BE))


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D or UpBlock2D: layers_per_block + 1 resnets, each eating one skip activation."""

    def __init__(self, cfg: UNetConfig, i: int, c_prev: int, temb: int, *, rngs: nnx.Rngs):
        rev = cfg.block_out_channels[::-1]
        c_out, c_skip, kw = rev[i], rev[min(i + 1, len(rev) - 1)], dtype_kw(cfg)
        res = dict(temb=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act=cfg.act_fn, rngs=rngs, **kw)
        n = cfg.layers_per_block + 1
        self.resnets = nnx.List([ResnetBlock((c_prev if j == 0 else c_out) + (c_skip if j == n - 1 else c_out),
                                             c_out, **res) for j in range(n)])
        cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        self.attentions = nnx.List([Transformer2D(c_out, cfg.heads[::-1][i], cfg, rngs=rngs) for _ in range(n)]) \
            if cross else None
        self.upsample = None if i == len(rev) - 1 else Upsample(c_out, rngs=rngs, **kw)

    def __call__(self, x_NHWC, skips, temb_BE, context_BSD):
        for j, resnet in enumerate(self.resnets):
            x_NHWC = resnet(jnp.concatenate([x_NHWC, skips[-1 - j]], axis=-1), temb_BE)
            if self.attentions is not None:
                x_NHWC = self.attentions[j](x_NHWC, context_BSD)
        if self.upsample is not None:
            x_NHWC = self.upsample(x_NHWC)
        return constrain_images(x_NHWC)


def timestep_embedding(t_B: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' get_timestep_embedding: (B, dim) sinusoids of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = t_B.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    def __init__(self, c_in: int, c_out: int, act: str, *, rngs: nnx.Rngs, **kw):
        self.linear_1 = Linear(c_in, c_out, ("embed", "mlp"), use_bias=True, rngs=rngs, **kw)
        self.linear_2 = Linear(c_out, c_out, ("mlp", "mlp"), use_bias=True, rngs=rngs, **kw)
        self.act = act

    def __call__(self, x):
        return self.linear_2(ACTIVATIONS[self.act](self.linear_1(x)))


def _run(block: nnx.Module, policy: str, *args):
    """block(*args) under a remat policy (the block is merged from its state inside the checkpointed function)."""
    if policy == "none":
        return block(*args)
    graphdef, state = nnx.split(block)
    return remat(lambda s, *a: nnx.merge(graphdef, s)(*a), policy)(state, *args)


class UNet(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw, ch = dtype_kw(cfg), cfg.block_out_channels
        temb = 4 * ch[0]
        self.conv_in = Conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
                            rngs=rngs, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], temb, cfg.act_fn, rngs=rngs, **kw)
        self.down_blocks = nnx.List([DownBlock(cfg, i, ch[max(i - 1, 0)], temb, rngs=rngs) for i in range(len(ch))])
        self.mid_block = MidBlock(cfg, temb, rngs=rngs)
        self.up_blocks = nnx.List([UpBlock(cfg, i, ch[::-1][max(i - 1, 0)], temb, rngs=rngs)
                                   for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, **kw)
        self.conv_out = Conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2,
                             rngs=rngs, **kw)

    def __call__(self, sample_NHWC: jax.Array, timesteps: jax.Array, encoder_hidden_states_BSD: jax.Array):
        """The noise (or v) prediction (B, H, W, out_channels); `timesteps` is a scalar or (B,), ints or floats."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        B, H, W, _ = sample_NHWC.shape
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if H % factor or W % factor:
            raise ValueError(f"UNet: latent size {H}x{W} must be a multiple of {factor} (one per down block)")
        x = sample_NHWC.astype(dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t_B = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (B,))
        t_emb = timestep_embedding(t_B, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_emb.astype(dtype))
        ctx = constrain(encoder_hidden_states_BSD.astype(dtype), ("batch", "length", "act_embed"))

        x = constrain_images(self.conv_in(x))
        skips = [x]
        for block in self.down_blocks:
            x, new = _run(block, cfg.remat, x, temb, ctx)
            skips.extend(new)
        x = _run(self.mid_block, cfg.remat, x, temb, ctx)
        for block in self.up_blocks:
            n = len(block.resnets)
            x = _run(block, cfg.remat, x, tuple(skips[-n:]), temb, ctx)
            skips = skips[:-n]
        return self.conv_out(ACTIVATIONS[cfg.act_fn](self.conv_norm_out(x)))


def widen_conv_in(unet: UNet, extra: int = 4) -> UNet:
    """InstructPix2Pix's editing UNet: conv_in takes `extra` more input channels (source-image latents) whose
    weights start at zero, so the widened model initially ignores them. Changes `unet` in place and returns it."""
    kernel = unet.conv_in.kernel
    old = kernel.get_value()
    zeros = jnp.zeros(old.shape[:2] + (extra,) + old.shape[3:], old.dtype)
    new = jnp.concatenate([old, zeros], axis=2)
    kernel.set_value(jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new)
    unet.cfg = unet.cfg.replace(in_channels=unet.cfg.in_channels + extra)
    return unet
