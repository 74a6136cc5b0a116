"""Building blocks of Stable Diffusion's UNet and VAE (diffusers' ResnetBlock2D, Downsample2D, Upsample2D), and
the small helpers both configs and models use."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from genllava_jax.layers import ACTIVATIONS, Conv, GroupNorm, Linear
from genllava_jax.sharding import constrain


def as_tuple(x):
    """Lists (from JSON) back to hashable tuples; anything else unchanged."""
    return tuple(x) if isinstance(x, (list, tuple)) else x


def dtype_kw(cfg) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def constrain_images(x_NHWC):
    return constrain(x_NHWC, ("batch", None, None, None))


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D ("default" time embedding norm): two GroupNorm-act-conv stages plus a shortcut."""

    def __init__(self, c_in: int, c_out: int, temb: int | None, groups: int, eps: float, act: str,
                 output_scale: float = 1.0, *, rngs: nnx.Rngs, **kw):
        self.norm1 = GroupNorm(groups, c_in, eps, **kw)
        self.conv1 = Conv(c_in, c_out, 3, padding=1, rngs=rngs, **kw)
        self.time_emb_proj = Linear(temb, c_out, ("mlp", "conv_out"), use_bias=True, rngs=rngs, **kw) if temb else None
        self.norm2 = GroupNorm(groups, c_out, eps, **kw)
        self.conv2 = Conv(c_out, c_out, 3, padding=1, rngs=rngs, **kw)
        self.conv_shortcut = Conv(c_in, c_out, 1, rngs=rngs, **kw) if c_in != c_out else None
        self.act, self.output_scale = act, output_scale

    def __call__(self, x_NHWC, temb_BE=None):
        act = ACTIVATIONS[self.act]
        h = self.conv1(act(self.norm1(x_NHWC)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(act(temb_BE))[:, None, None, :]
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x_NHWC = self.conv_shortcut(x_NHWC)
        return (x_NHWC + h) / self.output_scale


class Downsample(nnx.Module):
    """Stride-2 3x3 conv; padding 0 means torch's asymmetric (0, 1) pad first, as the VAE encoder uses."""

    def __init__(self, channels: int, padding: int = 1, *, rngs: nnx.Rngs, **kw):
        self.conv = Conv(channels, channels, 3, stride=2, padding=padding, rngs=rngs, **kw)
        self.pad = padding == 0

    def __call__(self, x_NHWC):
        if self.pad:
            x_NHWC = jnp.pad(x_NHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x_NHWC)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, **kw):
        self.conv = Conv(channels, channels, 3, padding=1, rngs=rngs, **kw)

    def __call__(self, x_NHWC):
        return self.conv(jnp.repeat(jnp.repeat(x_NHWC, 2, axis=1), 2, axis=2))
