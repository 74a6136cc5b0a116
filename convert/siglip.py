"""SigLIP vision tower: `transformers` checkpoints <-> our `SiglipVision`.

One key table serves every layout; only the prefix differs, and it is found from the keys when not given:
    ""                                          SiglipVisionModel (transformers >= 5)
    "vision_model."                             SiglipModel, or SiglipVisionModel saved by transformers 4
    "model.vision_tower.vision_tower.vision_model."   a LLaVA checkpoint
Keys outside the prefix (the text tower, the LLM, the projector) are ignored; inside it every key must be used.

    python -m convert siglip --from-hf HF_DIR --out OUR_DIR
    python -m convert siglip --to-hf OUR_DIR --out HF_DIR      # a SiglipVisionModel folder
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from genllava_jax.models.siglip import SiglipVision, SiglipVisionConfig

from .common import CONV, COPY, FLAT, LINEAR, ConversionError, Layout, Linear, Rule, Source, TensorReader, \
    find_prefix, load_state, read_json, with_prefix
from .stream import export_module

ANCHOR = "embeddings.patch_embedding.weight"
L, H = "encoder.layers.{i}.", "head."
RULES = (
    Rule(ANCHOR, "patch_embed/kernel", CONV),
    Rule("embeddings.patch_embedding.bias", "patch_embed/bias", COPY),
    Rule("embeddings.position_embedding.weight", "pos_embed", COPY),
    Rule(L + "layer_norm1.weight", "layers/norm1/scale", COPY),
    Rule(L + "layer_norm1.bias", "layers/norm1/bias", COPY),
    Rule(L + "layer_norm2.weight", "layers/norm2/scale", COPY),
    Rule(L + "layer_norm2.bias", "layers/norm2/bias", COPY),
    *(Rule(L + f"self_attn.{p}_proj.{w}", f"layers/attn/{p}/{o}", t)
      for p in "qkv" for w, o, t in (("weight", "kernel", LINEAR), ("bias", "bias", FLAT))),
    Rule(L + "self_attn.out_proj.weight", "layers/attn/o/kernel", Linear(n_in=2)),
    Rule(L + "self_attn.out_proj.bias", "layers/attn/o/bias", COPY),
    *(Rule(L + f"mlp.{fc}.{w}", f"layers/mlp/{fc}/{o}", t)
      for fc in ("fc1", "fc2") for w, o, t in (("weight", "kernel", LINEAR), ("bias", "bias", COPY))),
    Rule("post_layernorm.weight", "post_norm/scale", COPY),
    Rule("post_layernorm.bias", "post_norm/bias", COPY),
    Rule(H + "probe", "head/probe", COPY),
    Rule(H + "attention.in_proj_weight", "head/in_kernel", LINEAR),
    Rule(H + "attention.in_proj_bias", "head/in_bias", FLAT),
    Rule(H + "attention.out_proj.weight", "head/out/kernel", Linear(n_in=2)),
    Rule(H + "attention.out_proj.bias", "head/out/bias", COPY),
    Rule(H + "layernorm.weight", "head/norm/scale", COPY),
    Rule(H + "layernorm.bias", "head/norm/bias", COPY),
    *(Rule(H + f"mlp.{fc}.{w}", f"head/mlp/{fc}/{o}", t)
      for fc in ("fc1", "fc2") for w, o, t in (("weight", "kernel", LINEAR), ("bias", "bias", COPY))),
)


def _ignore(cfg: SiglipVisionConfig, prefix: str):
    # a checkpoint's pooling head may be dropped (GenLLaVA uses none); anything outside the prefix is not ours
    return lambda k: not k.startswith(prefix) or (not cfg.use_head and k.startswith(prefix + H))


def hf_source(path, *, prefix: str | None = None, hf_config: dict | None = None, **overrides) -> Source:
    """The vision tower of a HF folder matched to our model; `overrides` set config fields (use_head, dtype...).

    The config comes from `hf_config` or the folder's config.json (itself a SiglipVisionConfig, or holding one as
    `vision_config`); original LLaVA configs only name their tower, so pass its config as `hf_config` there.
    """
    path = Path(path)
    hf = hf_config if hf_config is not None else read_json(path / "config.json")
    if hf_config is None and hf.get("model_type") != "siglip_vision_model" and "vision_config" not in hf:
        raise ConversionError(f"{path / 'config.json'} has no SigLIP vision config (model_type="
                              f"{hf.get('model_type')!r}); pass hf_config= with the tower's config.json dict")
    cfg = SiglipVisionConfig.from_hf(hf, **overrides)
    reader = TensorReader(path)
    prefix = find_prefix(reader.keys(), ANCHOR) if prefix is None else prefix
    abstract = nnx.eval_shape(lambda: SiglipVision(cfg, rngs=nnx.Rngs(0)))
    return Source(reader, with_prefix(RULES, prefix), abstract, _ignore(cfg, prefix))


def from_hf(path, mesh=None, *, prefix: str | None = None, hf_config: dict | None = None,
            **overrides) -> SiglipVision:
    """Loads the vision tower from a HF folder (see `hf_source`)."""
    return load_state(hf_source(path, prefix=prefix, hf_config=hf_config, **overrides), mesh)


def layout(model: SiglipVision, prefix: str = "") -> Layout:
    return Layout(with_prefix(RULES, prefix), model.cfg.to_hf())


def to_hf(model: SiglipVision, path, *, prefix: str = "", dtype=None, max_shard_bytes: int = 5 * 2**30,
          overwrite: bool = False) -> None:
    """Writes a folder that `SiglipVisionModel.from_pretrained` loads with no missing or unexpected keys."""
    export_module(model, layout(model, prefix), path, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  overwrite=overwrite)
