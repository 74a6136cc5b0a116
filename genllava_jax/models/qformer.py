"""BLIP-2 Q-former (Flax NNX), mirroring `transformers.Blip2QFormerModel` called with `query_embeds`, and the
GenLLaVA generation head built on it (LLM [IMG] states -> Stable Diffusion conditioning).

Layer l has cross-attention iff l % cross_attention_frequency == 0, so the layers come in identical groups of
`cross_attention_frequency` (one cross-attention layer, then plain ones); the full groups are stacked and scanned,
and a shorter last group (num_layers not a multiple of the frequency, e.g. 3 layers at frequency 2) runs after them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from genllava_jax.attention import Mask, attention
from genllava_jax.layers import ACTIVATIONS, LayerNorm, Linear, param, scan_layers, stack_layers
from genllava_jax.sharding import constrain

_ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """The Q-former; defaults are BLIP-2's (`Blip2QFormerConfig`, 32 query tokens from `Blip2Config`)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_query_tokens: int = 32  # used by the head and by full-BLIP-2 checkpoints, not by the bare Q-former
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: str = "none"  # see layers.REMAT_POLICIES
    scan: bool = True
    attention: str = "auto"  # see genllava_jax.attention.BACKENDS

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.cross_attention_frequency < 1 or self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers} and cross_attention_frequency="
                             f"{self.cross_attention_frequency} must be at least 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_groups(self) -> int:
        """Full groups of `cross_attention_frequency` layers (stacked); `tail_layers` more follow them."""
        return self.num_layers // self.cross_attention_frequency

    @property
    def tail_layers(self) -> int:
        return self.num_layers % self.cross_attention_frequency

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides):
        """From a `Blip2QFormerConfig` dict, or a full `Blip2Config` dict (its `qformer_config` and
        `num_query_tokens`); otherwise `num_query_tokens` is our own field (default or override)."""
        q = hf.get("qformer_config", hf)  # use_qformer_text_input is irrelevant: queries never use the text branch
        kw = dict(hidden_size=q["hidden_size"], num_layers=q["num_hidden_layers"],
                  num_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
                  cross_attention_frequency=q.get("cross_attention_frequency", 2),
                  encoder_hidden_size=q.get("encoder_hidden_size", 1408),
                  layer_norm_eps=q.get("layer_norm_eps", 1e-12), hidden_act=q.get("hidden_act", "gelu"))
        if "num_query_tokens" in hf:
            kw["num_query_tokens"] = hf["num_query_tokens"]
        return cls(**{**kw, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """A `Blip2QFormerConfig` dict; unset fields (dropout, vocab for the unused text branch) take HF defaults."""
        return {
            "architectures": ["Blip2QFormerModel"], "model_type": "blip_2_qformer",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
            "cross_attention_frequency": self.cross_attention_frequency,
            "encoder_hidden_size": self.encoder_hidden_size, "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act, "use_qformer_text_input": False, "torch_dtype": self.param_dtype,
        }


class Attention(nnx.Module):
    """BLIP-2 attention block: multi-head attention, output dense, then LayerNorm(x + out) (post-norm)."""

    def __init__(self, cfg: QFormerConfig, kv_size: int, *, rngs: nnx.Rngs):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.q = Linear(D, (N, H), ("embed", "heads", "head_dim"), **kw)
        self.k = Linear(kv_size, (N, H), ("embed", "heads", "head_dim"), **kw)
        self.v = Linear(kv_size, (N, H), ("embed", "heads", "head_dim"), **kw)
        self.o = Linear((N, H), D, ("heads", "head_dim", "embed"), **kw)
        self.norm = LayerNorm(D, cfg.layer_norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.backend = cfg.attention

    def __call__(self, x_BTD, kv_BSE, mask: Mask):
        names = ("batch", "length", "act_heads", None)
        q, k, v = (constrain(checkpoint_name(proj(x), name), names) for proj, x, name in
                   ((self.q, x_BTD, "q_proj"), (self.k, kv_BSE, "k_proj"), (self.v, kv_BSE, "v_proj")))
        out = checkpoint_name(self.o(attention(q, k, v, mask, backend=self.backend)), "out_proj")
        return self.norm(x_BTD + out)


class Layer(nnx.Module):
    """One `Blip2QFormerLayer` on the query tokens: self-attention, [cross-attention], the query feed-forward."""

    def __init__(self, cfg: QFormerConfig, cross: bool, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.self_attn = Attention(cfg, D, rngs=rngs)
        self.cross_attn = Attention(cfg, cfg.encoder_hidden_size, rngs=rngs) if cross else None
        self.fc1 = Linear(D, F, ("embed", "mlp"), **kw)  # intermediate_query
        self.fc2 = Linear(F, D, ("mlp", "embed"), **kw)  # output_query
        self.mlp_norm = LayerNorm(D, cfg.layer_norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x_BTD, enc_BSE, enc_mask: Mask):
        x_BTD = checkpoint_name(x_BTD, "layer_input")
        x_BTD = self.self_attn(x_BTD, x_BTD, Mask())
        if self.cross_attn is not None:
            x_BTD = self.cross_attn(x_BTD, enc_BSE, enc_mask)
        h = constrain(self.act(checkpoint_name(self.fc1(x_BTD), "mlp_in")), ("batch", "length", "act_mlp"))
        return constrain(self.mlp_norm(x_BTD + checkpoint_name(self.fc2(h), "mlp_out")), _ACT)


class Group(nnx.Module):
    """`size` (default `cross_attention_frequency`) consecutive layers: the first with cross-attention."""

    def __init__(self, cfg: QFormerConfig, size: int | None = None, *, rngs: nnx.Rngs):
        size = cfg.cross_attention_frequency if size is None else size
        self.layers = nnx.List([Layer(cfg, cross=j == 0, rngs=rngs) for j in range(size)])

    def __call__(self, x_BTD, enc_BSE, enc_mask: Mask):
        for layer in self.layers:
            x_BTD = layer(x_BTD, enc_BSE, enc_mask)
        return x_BTD


class QFormer(nnx.Module):
    """`Blip2QFormerModel(query_embeds, encoder_hidden_states, encoder_attention_mask).last_hidden_state`."""

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype))
        self.groups = stack_layers(lambda r: Group(cfg, rngs=r), cfg.num_groups, rngs) if cfg.num_groups else None
        self.tail = Group(cfg, cfg.tail_layers, rngs=rngs) if cfg.tail_layers else None

    def __call__(self, query_embeds_BQD, encoder_hidden_states_BSE, encoder_attention_mask_BS=None):
        dtype = jnp.dtype(self.cfg.dtype)
        x = constrain(self.norm(query_embeds_BQD).astype(dtype), _ACT)  # embedding layernorm (dropout off)
        enc = constrain(encoder_hidden_states_BSE.astype(dtype), _ACT)
        # every query may see every valid encoder state (no causality, no positions)
        mask = Mask(kv_valid_BS=encoder_attention_mask_BS)

        def body(group, x, _):
            return group(x, enc, mask), None

        if self.groups is not None:
            x, _ = scan_layers(self.groups, body, x, policy=self.cfg.remat, scan=self.cfg.scan)
        if self.tail is not None:
            x = self.tail(x, enc, mask)
        return x


# ---------------------------------------------------------------------------------------------------------------
# The generation head


@dataclasses.dataclass(frozen=True)
class QFormerHeadConfig(QFormerConfig):
    """The head; defaults are GenLLaVA-7B's: 77 queries of width 768, 4 layers with cross-attention every layer to
    Mistral-7B's 4096-d states, output linear to SD 1.x's 768-d cross-attention width -> (B, 77, 768)."""

    num_layers: int = 4
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 4096
    num_query_tokens: int = 77
    llm_hidden_size: int = 4096  # input width; an input linear exists iff it differs from encoder_hidden_size
    out_dim: int | None = 768  # the UNet's cross-attention width; None: no output linear (a bare BLIP-2 head)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides):
        """From our export (a full-BLIP-2-style dict with a `gen_head` entry) or a BLIP-2 `Blip2Config` dict, which
        has no input or output linear: the head then computes BLIP-2's query output from the encoder states."""
        q = hf.get("qformer_config", hf)
        head = hf.get("gen_head", {"llm_hidden_size": q.get("encoder_hidden_size", 1408), "out_dim": None})
        return super().from_hf(hf, **{**head, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """Full-BLIP-2 layout (`qformer_config`, `num_query_tokens`) plus our `gen_head` fields."""
        return {"architectures": ["GenLLaVAQFormerHead"], "qformer_config": QFormerConfig.to_hf(self),
                "num_query_tokens": self.num_query_tokens,
                "gen_head": {"llm_hidden_size": self.llm_hidden_size, "out_dim": self.out_dim}}


TINY_HEAD = QFormerHeadConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              encoder_hidden_size=48, num_query_tokens=6, llm_hidden_size=64, out_dim=40)


class QFormerHead(nnx.Module):
    """[IMG] states -> conditioning (B, num_query_tokens, out_dim).

    As GILL does, the input is the LLM's last hidden states at the N [IMG] positions *plus* those tokens' input
    embeddings (summed), projected to the Q-former's encoder width when the LLM width differs; the learned query
    tokens attend to it through the Q-former, and an output linear maps to the UNet's cross-attention width.
    """

    def __init__(self, cfg: QFormerHeadConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(rngs=rngs, use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.in_proj = (Linear(cfg.llm_hidden_size, cfg.encoder_hidden_size, ("embed", "mlp"), **kw)
                        if cfg.llm_hidden_size != cfg.encoder_hidden_size else None)
        # (1, Q, D) as BLIP-2 stores them; std 0.02 as its initializer_range
        self.query_tokens = param(rngs, nnx.initializers.normal(0.02), (1, cfg.num_query_tokens, cfg.hidden_size),
                                  (None, None, "embed"), jnp.dtype(cfg.param_dtype))
        self.qformer = QFormer(cfg, rngs=rngs)
        self.out_proj = (Linear(cfg.hidden_size, cfg.out_dim, ("embed", "mlp"), **kw)
                         if cfg.out_dim is not None else None)

    def __call__(self, img_hidden_BND, img_embeds_BND, mask_BN=None):
        """img_hidden: last hidden states at the [IMG] positions; img_embeds: their input embeddings;
        mask_BN: which [IMG] states to attend to (default all)."""
        x_BNE = img_hidden_BND + img_embeds_BND
        if self.in_proj is not None:
            x_BNE = self.in_proj(x_BNE)
        q_BQD = jnp.broadcast_to(self.query_tokens[...], (x_BNE.shape[0],) + self.query_tokens.shape[1:])
        y_BQD = self.qformer(q_BQD, x_BNE, mask_BN)
        return y_BQD if self.out_proj is None else constrain(self.out_proj(y_BQD), _ACT)
