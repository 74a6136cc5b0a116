"""Mistral decoder (Flax NNX), mirroring `transformers.MistralForCausalLM`.

RMSNorm, RoPE (configurable theta), grouped-query attention with causal / sliding-window / padding masks, SwiGLU,
scanned layers under a named remat policy, tied or untied head, and a KV cache for prefill + one-token decode.
Masks are built from token positions, so the same code serves training, prefill and cached decode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from jax.ad_checkpoint import checkpoint_name

from genllava_jax.attention import Mask, attention
from genllava_jax.layers import Embed, Linear, RMSNorm, apply_rope, scan_layers, stack_layers
from genllava_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: str = "none"  # see layers.REMAT_POLICIES
    scan: bool = True
    attention: str = "auto"  # see genllava_jax.attention.BACKENDS

    def replace(self, **kw) -> "MistralConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "MistralConfig":
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (Mistral uses silu)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type={rope['rope_type']!r} is not supported, only the default RoPE")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), sliding_window=hf.get("sliding_window"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"), **overrides)

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps, "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "torch_dtype": self.param_dtype,
        }


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        D, N, K, H, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.input_norm = RMSNorm(D, cfg.rms_norm_eps, **kw)
        self.q = Linear(D, (N, H), ("embed", "heads", "head_dim"), **kw)
        self.k = Linear(D, (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.v = Linear(D, (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.o = Linear((N, H), D, ("heads", "head_dim", "embed"), **kw)
        self.post_attn_norm = RMSNorm(D, cfg.rms_norm_eps, **kw)
        self.gate = Linear(D, F, ("embed", "mlp"), **kw)
        self.up = Linear(D, F, ("embed", "mlp"), **kw)
        self.down = Linear(F, D, ("mlp", "embed"), **kw)
        self.rope_theta, self.backend = cfg.rope_theta, cfg.attention

    def __call__(self, x_BTD, positions_BT, mask: Mask, kv=None, index=None):
        """kv: this layer's cache (k_BSKH, v_BSKH), written at `index`; returns (x, new kv or None)."""
        x_BTD = checkpoint_name(x_BTD, "layer_input")
        h = self.input_norm(x_BTD)
        q, k, v = (checkpoint_name(proj(h), name) for proj, name in ((self.q, "q_proj"), (self.k, "k_proj"),
                                                                      (self.v, "v_proj")))
        q = constrain(apply_rope(q, positions_BT, self.rope_theta), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, positions_BT, self.rope_theta), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
            kv = (k, v)
        x_BTD = x_BTD + checkpoint_name(self.o(attention(q, k, v, mask, backend=self.backend)), "out_proj")
        h = self.post_attn_norm(x_BTD)
        gate, up = checkpoint_name(self.gate(h), "mlp_in"), checkpoint_name(self.up(h), "mlp_in")
        mlp = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        x_BTD = constrain(x_BTD + checkpoint_name(self.down(mlp), "mlp_out"), ("batch", "length", "act_embed"))
        return x_BTD, kv


class Output(NamedTuple):
    logits: jax.Array | None  # (B, T, V)
    hidden: jax.Array  # (B, T, D) after the final norm, as HF's hidden_states[-1]
    cache: dict | None


class Mistral(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                                              rngs=rngs, **kw)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        c = self.cfg
        dtype = jnp.dtype(dtype or c.dtype)
        kv_shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype),
                "positions": jnp.zeros((batch, max_len), jnp.int32),
                "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}

    def hidden(self, input_ids_BT=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None):
        """Final-normed hidden states (B, T, D) and the updated cache (None without one)."""
        x = self.embed(input_ids_BT) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(self.cfg.dtype))
        B, T, _ = x.shape
        x = constrain(x, ("batch", "length", "act_embed"))
        valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        start = 0 if cache is None else cache["index"]
        structural = cache is None and positions is None
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        if structural:  # one sequence whose positions are its indices: a mask the attention kernels take
            pad = None if attention_mask is None else valid
            mask = Mask(causal=True, sliding_window=self.cfg.sliding_window, q_valid_BT=pad, kv_valid_BS=pad)
        else:  # positions given, or keys in a cache: the mask from positions (dense attention)
            if cache is None:
                k_pos, k_valid = positions, valid
            else:
                k_pos = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions.astype(jnp.int32), start, 1)
                k_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, start, 1)
            mask = Mask(explicit_B1TS=position_mask(positions, k_pos, k_valid, self.cfg.sliding_window))

        def body(layer, x, kv):
            return layer(x, positions, mask, kv, start)

        kv = None if cache is None else (cache["k"], cache["v"])
        x, kv = scan_layers(self.layers, body, x, kv, policy=self.cfg.remat, scan=self.cfg.scan)
        new_cache = None if cache is None else {"k": kv[0], "v": kv[1], "positions": k_pos, "valid": k_valid,
                                                "index": start + T}
        return self.final_norm(x), new_cache

    def head_weight(self) -> tuple[jax.Array, int]:
        """(the output head's weight in the compute dtype, its vocabulary axis): (D, V) untied, (V, D) tied."""
        if self.lm_head is None:
            return self.embed.embedding[...].astype(jnp.dtype(self.cfg.dtype)), 0
        return self.lm_head.kernel[...].astype(jnp.dtype(self.cfg.dtype)), 1

    def logits(self, hidden):
        logits = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(logits, ("batch", "length", "act_vocab")[-logits.ndim:])

    def __call__(self, input_ids_BT=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None):
        hidden, cache = self.hidden(input_ids_BT, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    positions=positions, cache=cache)
        return Output(self.logits(hidden), hidden, cache)


def position_mask(q_pos_BT, k_pos_BS, k_valid_BS, sliding_window: int | None) -> jax.Array:
    """Boolean (B, 1, T, S) mask from positions: key valid, not in the future, and inside the window."""
    mask = k_valid_BS[:, None, None, :].astype(bool)
    diff = q_pos_BT[:, None, :, None] - k_pos_BS[:, None, None, :]
    mask &= diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Generation: one jitted function, prefill then a fori_loop of one-token cached decode steps.


def sample_token(logits_BV, rng, temperature: float, top_p: float = 1.0):
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest set whose mass reaches top_p (the first token is always kept)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if rng.ndim:  # one key per row: a row's draws do not depend on the batch it is decoded in
        return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def split_key(rng):
    """(next key, key for this step) of one key or of a (B,) array of per-row keys."""
    if rng.ndim:
        pair = jax.vmap(jax.random.split)(rng)
        return pair[:, 0], pair[:, 1]
    return tuple(jax.random.split(rng))


class Decoded(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) new tokens; after a row's stop token, pad_id
    lengths: jax.Array  # (B,) tokens each row generated, its stop token included


def decode(model: Mistral, attention_mask, rng, *, input_ids=None, inputs_embeds=None, max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None, stop_ids: tuple = (),
           pad_id: int = 0, on_token: Callable | None = None) -> Decoded:
    """Traceable prefill + cached one-token steps after left-padded prompts (ids or embeddings), in a
    `lax.while_loop` that ends when every row has emitted a stop token (`eos_id` or one of `stop_ids`) or after
    `max_new_tokens`. `on_token(step, tokens_B)` streams each step's tokens to the host (ordered io_callback).
    `rng`: one key, or (B,) keys, one per row (a row then samples the same tokens in any batch).
    """
    prompt = input_ids if inputs_embeds is None else inputs_embeds
    B, T = prompt.shape[:2]
    stops = jnp.asarray(tuple(stop_ids) + (() if eos_id is None else (eos_id,)), jnp.int32)
    prompt_len = attention_mask.sum(-1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(attention_mask, -1) - 1, 0).astype(jnp.int32)
    hidden, cache = model.hidden(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 positions=positions, cache=model.init_cache(B, T + max_new_tokens))

    def cond(carry):
        i, done = carry[0], carry[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, logits, cache, done, lengths, rng = carry
        rng, sub = split_key(rng)
        tok = jnp.where(done, pad_id, sample_token(logits, sub, temperature, top_p))
        if on_token is not None:
            io_callback(on_token, None, i, tok, ordered=True)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, 1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        hidden, cache = model.hidden(tok[:, None], positions=(prompt_len + i)[:, None], cache=cache)
        return i + 1, tokens, model.logits(hidden[:, -1]), cache, done, lengths, rng

    init = (jnp.int32(0), jnp.full((B, max_new_tokens), pad_id, jnp.int32), model.logits(hidden[:, -1]), cache,
            jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), rng)
    out = jax.lax.while_loop(cond, body, init)
    return Decoded(out[1], out[5])


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "eos_id",
                                             "pad_id"))
def _generate(graphdef, state, input_ids, attention_mask, rng, **kw):
    return decode(nnx.merge(graphdef, state), attention_mask, rng, input_ids=input_ids, **kw).tokens


def generate(model: Mistral, input_ids, attention_mask=None, *, max_new_tokens: int, rng=None,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0):
    """New tokens (B, max_new_tokens) after left-padded prompts; rows that emitted `eos_id` continue with `pad_id`.

    temperature 0 is greedy. Compiles once per (shapes, settings).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, input_ids, attention_mask, rng, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_p=float(top_p), eos_id=eos_id, pad_id=pad_id)
