"""pytorch-fid's FID Inception-v3 (the TF 2015-12-05 graph FID is defined with), up to its pool3 features.

`FIDInception()(x_NHWC)` equals `pytorch_fid.inception.InceptionV3([3])(x_NCHW)[0][:, :, 0, 0]`: images in [0, 1] of
any size, resized bilinearly to 299 x 299 (no antialiasing, as F.interpolate), scaled to [-1, 1], then the
network; (N, 2048) features. The FID variant's blocks differ from torchvision's: average pools leave the padding
out of the mean, and the last block max-pools. Module names mirror the torch ones (`Mixed_5b.branch1x1.conv`), so
`convert/inception.py` maps keys one to one; BatchNorm is in inference form (running statistics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from genllava_jax import layers

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """The network is fixed (pytorch-fid's); only the dtypes vary."""

    dtype: str = "float32"
    param_dtype: str = "float32"

    def replace(self, **kw) -> "InceptionConfig":
        return dataclasses.replace(self, **kw)

    def to_hf(self) -> dict:
        return {"model_type": "pytorch_fid_inception_v3", "torch_dtype": self.param_dtype}


class BatchNorm(nnx.Module):
    """torch BatchNorm2d in eval mode: (x - running_mean) / sqrt(running_var + eps) * weight + bias."""

    def __init__(self, ch: int, eps: float, *, dtype: Dtype, param_dtype: Dtype):
        self.scale = layers.param(None, nnx.initializers.ones, (ch,), ("norm",), param_dtype)
        self.bias = layers.param(None, nnx.initializers.zeros, (ch,), ("norm",), param_dtype)
        self.mean = layers.param(None, nnx.initializers.zeros, (ch,), ("norm",), param_dtype)
        self.var = layers.param(None, nnx.initializers.ones, (ch,), ("norm",), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
        return ((x - self.mean[...]) * inv + self.bias[...]).astype(self.dtype)


class BasicConv(nnx.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0, rngs: nnx.Rngs,
                 dtype: Dtype, param_dtype: Dtype):
        self.conv = layers.Conv(cin, cout, kernel, stride=stride, padding=padding, use_bias=False, rngs=rngs,
                                dtype=dtype, param_dtype=param_dtype)
        self.bn = BatchNorm(cout, 1e-3, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, stride: int, pad: int = 0):
    return nnx.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


def avg_pool_no_pad(x):
    """3x3, stride 1, padding 1, the padded zeros left out of each mean (count_include_pad=False, as TF)."""
    window = lambda t: jax.lax.reduce_window(t, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),  # noqa: E731
                                             ((0, 0), (1, 1), (1, 1), (0, 0)))
    return window(x) / window(jnp.ones(x.shape[:3] + (1,), x.dtype))


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, **kw):
        conv = functools.partial(BasicConv, **kw)
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = conv(cin, 48, 1), conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_no_pad(x))], -1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, **kw):
        conv = functools.partial(BasicConv, **kw)
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], -1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, **kw):
        conv = functools.partial(BasicConv, **kw)
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_no_pad(x))], -1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, **kw):
        conv = functools.partial(BasicConv, **kw)
        self.branch3x3_1, self.branch3x3_2 = conv(cin, 192, 1), conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 2)], -1)


class InceptionE(nnx.Module):
    """`pool="avg"`: FIDInceptionE_1 (padding left out of the mean); "max": FIDInceptionE_2."""

    def __init__(self, cin: int, pool: str, **kw):
        conv = functools.partial(BasicConv, **kw)
        self.pool = pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_no_pad(x) if self.pool == "avg" else max_pool(x, 1, 1)
        return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], -1)


class FIDInception(nnx.Module):
    """pool3 features (N, 2048) of images x_NHWC in [0, 1]; see the module doc."""

    SIZE = 299

    def __init__(self, cfg: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(rngs=rngs or nnx.Rngs(0), dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.dtype = dtype

    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        n, _, _, c = x_NHWC.shape
        x = jax.image.resize(x_NHWC.astype(jnp.float32), (n, self.SIZE, self.SIZE, c), "linear", antialias=False)
        x = (2 * x - 1).astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 2)))
        x = max_pool(x, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
