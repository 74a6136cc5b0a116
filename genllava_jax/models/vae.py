"""Stable Diffusion's VAE (Flax NNX, NHWC), mirroring `diffusers.AutoencoderKL`.

Encoder: conv_in, ResNet blocks with stride-2 downsampling, a mid block with single-head self-attention, GroupNorm +
SiLU + conv_out to (mean, log-variance); quant_conv. Decoder: post_quant_conv, conv_in, mid block, ResNet blocks with
nearest upsampling, conv_out. Images are in [-1, 1]; diffusion latents are `(z - shift_factor) * scaling_factor`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from genllava_jax.layers import ACTIVATIONS, Conv, GroupNorm
from genllava_jax.models.sd_blocks import Downsample, ResnetBlock, Upsample, as_tuple, constrain_images, dtype_kw
from genllava_jax.models.unet import Attention


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Defaults: Stable Diffusion v1.x."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True  # kept for the round trip; diffusers' pipelines run the VAE in float32 if set
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"  # the mid block's; see genllava_jax.attention.BACKENDS

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, as_tuple(getattr(self, f.name)))

    def replace(self, **kw) -> "VAEConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "VAEConfig":
        n = len(hf["block_out_channels"])
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if list(hf.get(key, [kind] * n)) != [kind] * n:
                raise ValueError(f"VAE config: {key}={hf[key]!r} is not supported (only {kind})")
        for key in ("latents_mean", "latents_std"):
            if hf.get(key) is not None:
                raise ValueError(f"VAE config: {key} is not supported (Stable Diffusion 1/2 VAEs have none)")
        size = hf.get("sample_size", 32)
        return cls(
            in_channels=hf.get("in_channels", 3), out_channels=hf.get("out_channels", 3),
            block_out_channels=hf["block_out_channels"], layers_per_block=hf.get("layers_per_block", 1),
            act_fn=hf.get("act_fn", "silu"), latent_channels=hf.get("latent_channels", 4),
            norm_num_groups=hf.get("norm_num_groups", 32), sample_size=size[0] if isinstance(size, list) else size,
            scaling_factor=hf.get("scaling_factor", 0.18215), shift_factor=hf.get("shift_factor"),
            force_upcast=hf.get("force_upcast", True), use_quant_conv=hf.get("use_quant_conv", True),
            use_post_quant_conv=hf.get("use_post_quant_conv", True),
            mid_block_add_attention=hf.get("mid_block_add_attention", True), **overrides)

    def to_hf(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "act_fn": self.act_fn, "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size, "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor, "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


class SpatialAttention(Attention):
    """The mid block's attention: GroupNorm, one head over all pixels, biased projections, residual."""

    def __init__(self, channels: int, groups: int, *, backend: str, rngs: nnx.Rngs, **kw):
        super().__init__(channels, 1, channels, bias=True, backend=backend, rngs=rngs, **kw)
        self.group_norm = GroupNorm(groups, channels, 1e-6, **kw)

    def __call__(self, x_NHWC):
        B, H, W, C = x_NHWC.shape
        h_BTD = self.group_norm(x_NHWC).reshape(B, H * W, C)
        return x_NHWC + super().__call__(h_BTD).reshape(B, H, W, C)


class MidBlock(nnx.Module):
    """UNetMidBlock2D without time embedding: resnet, attention, resnet."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        c, kw = cfg.block_out_channels[-1], dtype_kw(cfg)
        res = dict(temb=None, groups=cfg.norm_num_groups, eps=1e-6, act=cfg.act_fn, rngs=rngs, **kw)
        self.resnets = nnx.List([ResnetBlock(c, c, **res), ResnetBlock(c, c, **res)])
        self.attentions = (nnx.List([SpatialAttention(c, cfg.norm_num_groups, backend=cfg.attention, rngs=rngs,
                                                       **kw)]) if cfg.mid_block_add_attention else None)

    def __call__(self, x_NHWC):
        x_NHWC = self.resnets[0](x_NHWC)
        if self.attentions is not None:
            x_NHWC = self.attentions[0](x_NHWC)
        return self.resnets[1](x_NHWC)


class ResnetStack(nnx.Module):
    """DownEncoderBlock2D (resnets, then a padding-0 downsample) or UpDecoderBlock2D (resnets, then upsample)."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, n: int, resample: str | None, *, rngs: nnx.Rngs):
        kw = dtype_kw(cfg)
        res = dict(temb=None, groups=cfg.norm_num_groups, eps=1e-6, act=cfg.act_fn, rngs=rngs, **kw)
        self.resnets = nnx.List([ResnetBlock(c_in if j == 0 else c_out, c_out, **res) for j in range(n)])
        self.downsample = Downsample(c_out, 0, rngs=rngs, **kw) if resample == "down" else None
        self.upsample = Upsample(c_out, rngs=rngs, **kw) if resample == "up" else None

    def __call__(self, x_NHWC):
        for resnet in self.resnets:
            x_NHWC = resnet(x_NHWC)
        if self.downsample is not None:
            x_NHWC = self.downsample(x_NHWC)
        if self.upsample is not None:
            x_NHWC = self.upsample(x_NHWC)
        return constrain_images(x_NHWC)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        ch, kw, n = cfg.block_out_channels, dtype_kw(cfg), len(cfg.block_out_channels)
        self.conv_in = Conv(cfg.in_channels, ch[0], 3, padding=1, rngs=rngs, **kw)
        self.down_blocks = nnx.List([ResnetStack(cfg, ch[max(i - 1, 0)], ch[i], cfg.layers_per_block,
                                                 "down" if i < n - 1 else None, rngs=rngs) for i in range(n)])
        self.mid_block = MidBlock(cfg, rngs=rngs)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], 1e-6, **kw)
        self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, 3, padding=1, rngs=rngs, **kw)
        self.act = cfg.act_fn

    def __call__(self, x_NHWC):
        x_NHWC = self.conv_in(x_NHWC)
        for block in self.down_blocks:
            x_NHWC = block(x_NHWC)
        return self.conv_out(ACTIVATIONS[self.act](self.conv_norm_out(self.mid_block(x_NHWC))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        rev, kw, n = cfg.block_out_channels[::-1], dtype_kw(cfg), len(cfg.block_out_channels)
        self.conv_in = Conv(cfg.latent_channels, rev[0], 3, padding=1, rngs=rngs, **kw)
        self.mid_block = MidBlock(cfg, rngs=rngs)
        self.up_blocks = nnx.List([ResnetStack(cfg, rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1,
                                               "up" if i < n - 1 else None, rngs=rngs) for i in range(n)])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], 1e-6, **kw)
        self.conv_out = Conv(rev[-1], cfg.out_channels, 3, padding=1, rngs=rngs, **kw)
        self.act = cfg.act_fn

    def __call__(self, z_NHWC):
        x_NHWC = self.mid_block(self.conv_in(z_NHWC))
        for block in self.up_blocks:
            x_NHWC = block(x_NHWC)
        return self.conv_out(ACTIVATIONS[self.act](self.conv_norm_out(x_NHWC)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw, L = dtype_kw(cfg), cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quant_conv = Conv(2 * L, 2 * L, 1, rngs=rngs, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(L, L, 1, rngs=rngs, **kw) if cfg.use_post_quant_conv else None

    def encode(self, x_NHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior's (mean, log-variance), each (B, H/f, W/f, latent_channels); log-variance in [-30, 20]."""
        moments = self.encoder(x_NHWC.astype(jnp.dtype(self.cfg.dtype)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    @staticmethod
    def sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

    def decode(self, z_NHWC: jax.Array) -> jax.Array:
        z_NHWC = z_NHWC.astype(jnp.dtype(self.cfg.dtype))
        if self.post_quant_conv is not None:
            z_NHWC = self.post_quant_conv(z_NHWC)
        return self.decoder(z_NHWC)

    def __call__(self, x_NHWC: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode the posterior mean, or a sample of it given `rng` (AutoencoderKL.forward)."""
        mean, logvar = self.encode(x_NHWC)
        return self.decode(mean if rng is None else self.sample(mean, logvar, rng))

    def latents(self, x_NHWC: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Diffusion latents of images in [-1, 1]: the posterior mean (or a sample), shifted and scaled."""
        mean, logvar = self.encode(x_NHWC)
        z = mean if rng is None else self.sample(mean, logvar, rng)
        return (z - (self.cfg.shift_factor or 0.0)) * self.cfg.scaling_factor

    def decode_latents(self, latents_NHWC: jax.Array) -> jax.Array:
        """Images (in about [-1, 1]) from diffusion latents: the inverse scaling, then decode."""
        return self.decode(latents_NHWC / self.cfg.scaling_factor + (self.cfg.shift_factor or 0.0))
