"""Mistral: `transformers.MistralForCausalLM` checkpoints <-> our `Mistral`.

    python -m convert mistral --from-hf HF_DIR --out OUR_DIR     # orbax checkpoint + config.json
    python -m convert mistral --to-hf OUR_DIR --out HF_DIR       # config.json + safetensors (+ index)
"""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from genllava_jax.models.mistral import Mistral, MistralConfig

from .common import COPY, LINEAR, Linear, Rule, TensorReader, export_hf, hf_tensors, load_state

L = "model.layers.{i}."
RULES = (
    Rule("model.embed_tokens.weight", "embed/embedding", COPY),
    Rule("model.norm.weight", "final_norm/scale", COPY),
    Rule("lm_head.weight", "lm_head/kernel", LINEAR),
    Rule(L + "input_layernorm.weight", "layers/input_norm/scale", COPY),
    Rule(L + "post_attention_layernorm.weight", "layers/post_attn_norm/scale", COPY),
    Rule(L + "self_attn.q_proj.weight", "layers/q/kernel", LINEAR),
    Rule(L + "self_attn.k_proj.weight", "layers/k/kernel", LINEAR),
    Rule(L + "self_attn.v_proj.weight", "layers/v/kernel", LINEAR),
    Rule(L + "self_attn.o_proj.weight", "layers/o/kernel", Linear(n_in=2)),
    Rule(L + "mlp.gate_proj.weight", "layers/gate/kernel", LINEAR),
    Rule(L + "mlp.up_proj.weight", "layers/up/kernel", LINEAR),
    Rule(L + "mlp.down_proj.weight", "layers/down/kernel", LINEAR),
)


def _ignore(cfg: MistralConfig):
    # old checkpoints store RoPE buffers; tied checkpoints may still carry a copy of the embedding as lm_head
    return lambda k: k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight")


def from_hf(path, mesh=None, **overrides) -> Mistral:
    """Loads a HF Mistral folder (config.json + safetensors); `overrides` set config fields (dtype, remat...)."""
    path = Path(path)
    cfg = MistralConfig.from_hf(json.loads((path / "config.json").read_text()), **overrides)
    abstract = nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0)))
    return load_state(TensorReader(path), RULES, abstract, mesh, ignore=_ignore(cfg))


def to_hf(model: Mistral, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Writes a folder that `MistralForCausalLM.from_pretrained` loads with no missing or unexpected keys."""
    export_hf(path, model.cfg.to_hf(), hf_tensors(model, RULES, dtype), dtype=dtype, max_shard_bytes=max_shard_bytes,
              overwrite=overwrite)
