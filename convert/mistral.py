"""Mistral: `transformers.MistralForCausalLM` checkpoints <-> our `Mistral`.

    python -m convert mistral --from-hf HF_DIR --out OUR_DIR     # orbax checkpoint + config.json
    python -m convert mistral --to-hf OUR_DIR --out HF_DIR       # config.json + safetensors (+ index)
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from genllava_jax.models.mistral import Mistral, MistralConfig

from .common import COPY, LINEAR, Layout, Linear, Rule, Source, TensorReader, load_state, read_json
from .stream import export_module


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


def hf_source(path, *, hf_config: dict | None = None, **overrides) -> Source:
    """A HF Mistral (or Llama) folder matched to our model; the config is `hf_config` or its config.json;
    `overrides` set config fields."""
    path = Path(path)
    cfg = MistralConfig.from_hf(hf_config if hf_config is not None else read_json(path / "config.json"), **overrides)
    abstract = nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0)))
    return Source(TensorReader(path), RULES, abstract, _ignore(cfg))


def from_hf(path, mesh=None, **overrides) -> Mistral:
    """Loads a HF Mistral folder; `overrides` set config fields (dtype, remat...)."""
    return load_state(hf_source(path, **overrides), mesh)


def layout(model: Mistral) -> Layout:
    return Layout(RULES, model.cfg.to_hf())


def to_hf(model: Mistral, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Writes a folder that `MistralForCausalLM.from_pretrained` loads with no missing or unexpected keys."""
    export_module(model, layout(model), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
