"""SigLIP vision tower (Flax NNX), mirroring `transformers.SiglipVisionModel`.

Patch embedding (a conv on NHWC images), learned position embeddings (bicubically resized when the patch grid
differs from the trained one, exactly as HF's `interpolate_pos_encoding=True`), pre-LN encoder layers stacked and
scanned under a named remat policy, post-layernorm, the optional MAP pooling head, and the hidden state of any layer
(`feature_layer`, an index into HF's `hidden_states` tuple: 0 = embeddings, -1 = last layer before the post-LN).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from genllava_jax.attention import attention
from genllava_jax.layers import ACTIVATIONS, Conv, LayerNorm, Linear, param, scan_layers, stack_layers
from genllava_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    use_head: bool = False
    feature_layer: int = -2  # index into HF's hidden_states tuple; GenLLaVA/LLaVA take layer -2
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: str = "none"  # see layers.REMAT_POLICIES
    scan: bool = True
    attention: str = "auto"  # see genllava_jax.attention.BACKENDS

    def replace(self, **kw) -> "SiglipVisionConfig":
        return dataclasses.replace(self, **kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side at the trained resolution."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "SiglipVisionConfig":
        """From a SiglipVisionConfig dict, or any config holding one as `vision_config` (SiglipConfig, Llava)."""
        hf = hf.get("vision_config", hf)
        if hf.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(f"model_type={hf['model_type']!r} is not a SigLIP vision config")
        for key in ("image_size", "patch_size"):
            if not isinstance(hf.get(key, 0), int):
                raise ValueError(f"{key}={hf[key]!r}: only square sizes (a single int) are supported")
        if hf.get("hidden_size", 768) % hf.get("num_attention_heads", 12):
            raise ValueError(f"hidden_size={hf['hidden_size']} is not divisible by num_attention_heads")
        act = hf.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        # HF's SiglipVisionConfig defaults fill what a (diff-saved) config leaves out
        fields = dict(hidden_size=hf.get("hidden_size", 768), intermediate_size=hf.get("intermediate_size", 3072),
                      num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
                      num_channels=hf.get("num_channels", 3), image_size=hf.get("image_size", 224),
                      patch_size=hf.get("patch_size", 16), hidden_act=act,
                      layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
                      use_head=bool(hf.get("vision_use_head", True)))
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_channels": self.num_channels, "image_size": self.image_size, "patch_size": self.patch_size,
            "hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps, "attention_dropout": 0.0,
            "vision_use_head": self.use_head, "torch_dtype": self.param_dtype,
        }


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's 1-D bicubic resize (align_corners=False, A=-0.75, clamped border, no
    antialias): the separable half of `F.interpolate(mode="bicubic")`."""
    A = -0.75
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src)
    t = src - i0
    near = lambda x: ((A + 2) * x - (A + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((A * x - 5 * A) * x + 8 * A) * x - 4 * A  # 1 < |x| < 2
    w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = np.clip(i0[:, None].astype(int) + np.arange(-1, 3), 0, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.ravel()), w.ravel())
    return m


class Attention(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.q = Linear(D, (N, H), ("embed", "heads", "head_dim"), **kw)
        self.k = Linear(D, (N, H), ("embed", "heads", "head_dim"), **kw)
        self.v = Linear(D, (N, H), ("embed", "heads", "head_dim"), **kw)
        self.o = Linear((N, H), D, ("heads", "head_dim", "embed"), **kw)
        self.backend = cfg.attention

    def __call__(self, x_BTD):
        names = ("batch", "length", "act_heads", None)
        q, k, v = (constrain(checkpoint_name(proj(x_BTD), name), names)
                   for proj, name in ((self.q, "q_proj"), (self.k, "k_proj"), (self.v, "v_proj")))
        return checkpoint_name(self.o(attention(q, k, v, backend=self.backend)), "out_proj")


class MLP(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        h = constrain(self.act(checkpoint_name(self.fc1(x), "mlp_in")), ("batch", "length", "act_mlp"))
        return checkpoint_name(self.fc2(h), "mlp_out")


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD):
        x_BTD = checkpoint_name(x_BTD, "layer_input")
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        return constrain(x_BTD + self.mlp(self.norm2(x_BTD)), ("batch", "length", "act_embed"))


class PoolingHead(nnx.Module):
    """Multihead attention pooling: one learned probe attends to all patches (torch.nn.MultiheadAttention)."""

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        pdt = kw["param_dtype"]
        self.probe = param(rngs, nnx.initializers.xavier_uniform(), (1, 1, D),
                           (None, None, "embed"), pdt)
        # torch keeps q, k and v fused: in_proj_weight (3D, D) -> our kernel (D, 3, N, H)
        self.in_kernel = param(rngs, nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3)), (D, 3, N, H),
                               ("embed", None, "heads", "head_dim"), pdt)
        self.in_bias = param(rngs, nnx.initializers.zeros, (3, N, H), (None, "heads", "head_dim"), pdt)
        self.out = Linear((N, H), D, ("heads", "head_dim", "embed"), use_bias=True, rngs=rngs, **kw)
        self.norm = LayerNorm(D, cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dtype, self.backend = kw["dtype"], cfg.attention

    def __call__(self, x_BTD):
        w = self.in_kernel[...].astype(self.dtype)
        b = self.in_bias[...].astype(self.dtype)
        probe_B1D = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x_BTD.shape[0], 1, x_BTD.shape[-1]))
        q = jnp.einsum("btd,dnh->btnh", probe_B1D, w[:, 0]) + b[0]
        k = jnp.einsum("btd,dnh->btnh", x_BTD, w[:, 1]) + b[1]
        v = jnp.einsum("btd,dnh->btnh", x_BTD, w[:, 2]) + b[2]
        h_B1D = self.out(attention(q, k, v, backend=self.backend))
        return (h_B1D + self.mlp(self.norm(h_B1D)))[:, 0]


class Output(NamedTuple):
    last_hidden_state: jax.Array  # (B, T, D) after the post-layernorm
    pooler_output: jax.Array | None  # (B, D) from the MAP head, None without one
    features: jax.Array  # (B, T, D): HF's hidden_states[feature_layer]


class SiglipVision(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.hidden_size
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.patch_embed = Conv(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size, rngs=rngs, **kw)
        self.pos_embed = param(rngs, nnx.initializers.normal(D ** -0.5), (cfg.grid ** 2, D), (None, "embed"),
                               kw["param_dtype"])
        self.layers = stack_layers(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.post_norm = LayerNorm(D, cfg.layer_norm_eps, **kw)
        self.head = PoolingHead(cfg, rngs=rngs) if cfg.use_head else None

    def position_embeddings(self, gh: int, gw: int) -> jax.Array:
        """(gh * gw, D), bicubically resized from the trained grid when (gh, gw) differs from it."""
        g = self.cfg.grid
        pos = self.pos_embed[...].astype(jnp.dtype(self.cfg.dtype))
        if (gh, gw) == (g, g):
            return pos
        mh, mw = (jnp.asarray(bicubic_matrix(g, n), pos.dtype) for n in (gh, gw))
        return jnp.einsum("hi,wj,ijd->hwd", mh, mw, pos.reshape(g, g, -1)).reshape(gh * gw, -1)

    def __call__(self, pixel_values_BHWC: jax.Array, feature_layer: int | None = None) -> Output:
        """Images of any size: the patch grid sets the sequence length and the position embeddings follow it."""
        L = self.cfg.num_layers
        k = self.cfg.feature_layer if feature_layer is None else feature_layer
        if not -(L + 1) <= k <= L:
            raise ValueError(f"feature_layer={k} is outside HF's hidden_states tuple of {L + 1} entries")
        k %= L + 1
        x = self.patch_embed(pixel_values_BHWC)
        B, gh, gw, D = x.shape
        x = x.reshape(B, gh * gw, D) + self.position_embeddings(gh, gw)
        x = constrain(x, ("batch", "length", "act_embed"))

        def body(layer, carry, i):
            x, feat = carry
            x = layer(x)
            return (x, jnp.where(i + 1 == k, x, feat)), None  # keep only the requested layer's output

        (x, feat), _ = scan_layers(self.layers, body, (x, x), jnp.arange(L), policy=self.cfg.remat,
                                   scan=self.cfg.scan)
        x = self.post_norm(x)
        return Output(x, None if self.head is None else self.head(x), feat)
