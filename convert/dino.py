"""A transformers `ViTModel` folder (DINO ViT-S/16: `facebook/dino-vits16`) <-> our `DinoViT`.

    python -m convert dino --from-hf HF_DIR --out OUR_DIR
    python -m convert dino --to-hf OUR_DIR --out HF_DIR

The ViT is found by its `embeddings.cls_token` key, bare (ViTModel) or prefixed (`vit.` in the task models, whose
heads are then ignored); the pooler is loaded when the checkpoint has one. `mask_token` (masked image modelling)
does not enter the forward pass and is ignored.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from genllava_jax.models.dino import DinoViT, ViTConfig

from .common import CONV, COPY, FLAT, LINEAR, Layout, Linear, Rule, Source, TensorReader, find_prefix, load_state, \
    read_json, with_prefix
from .stream import export_module

ANCHOR = "embeddings.cls_token"
L = "encoder.layer.{i}."
RULES = (
    Rule(ANCHOR, "cls_token", COPY),
    Rule("embeddings.position_embeddings", "pos_embed", COPY),
    Rule("embeddings.patch_embeddings.projection.weight", "patch_embed/kernel", CONV),
    Rule("embeddings.patch_embeddings.projection.bias", "patch_embed/bias", COPY),
    Rule(L + "layernorm_before.weight", "layers/norm1/scale", COPY),
    Rule(L + "layernorm_before.bias", "layers/norm1/bias", COPY),
    Rule(L + "layernorm_after.weight", "layers/norm2/scale", COPY),
    Rule(L + "layernorm_after.bias", "layers/norm2/bias", COPY),
    *(Rule(L + f"attention.attention.{hf}.{w}", f"layers/attn/{p}/{o}", t)
      for hf, p in (("query", "q"), ("key", "k"), ("value", "v"))
      for w, o, t in (("weight", "kernel", LINEAR), ("bias", "bias", FLAT))),
    Rule(L + "attention.output.dense.weight", "layers/attn/o/kernel", Linear(n_in=2)),
    Rule(L + "attention.output.dense.bias", "layers/attn/o/bias", COPY),
    Rule(L + "intermediate.dense.weight", "layers/mlp/fc1/kernel", LINEAR),
    Rule(L + "intermediate.dense.bias", "layers/mlp/fc1/bias", COPY),
    Rule(L + "output.dense.weight", "layers/mlp/fc2/kernel", LINEAR),
    Rule(L + "output.dense.bias", "layers/mlp/fc2/bias", COPY),
    Rule("layernorm.weight", "norm/scale", COPY),
    Rule("layernorm.bias", "norm/bias", COPY),
    Rule("pooler.dense.weight", "pooler/kernel", LINEAR),
    Rule("pooler.dense.bias", "pooler/bias", COPY),
)


def hf_source(path, **overrides) -> Source:
    """A ViTModel (or the `vit.` of a ViT task model); `overrides` set config fields (dtype, remat)."""
    path = Path(path)
    reader = TensorReader(path)
    prefix = find_prefix(reader.keys(), ANCHOR)
    overrides.setdefault("use_pooler", f"{prefix}pooler.dense.weight" in reader)
    cfg = ViTConfig.from_hf(read_json(path / "config.json"), **overrides)
    abstract = nnx.eval_shape(lambda: DinoViT(cfg, rngs=nnx.Rngs(0)))
    ignore = lambda k: not k.startswith(prefix) or k == f"{prefix}embeddings.mask_token"  # noqa: E731
    return Source(reader, with_prefix(RULES, prefix), abstract, ignore)


def from_hf(path, mesh=None, **overrides) -> DinoViT:
    """Loads a ViTModel (see `hf_source`)."""
    return load_state(hf_source(path, **overrides), mesh)


def layout(model: DinoViT) -> Layout:
    return Layout(RULES, model.cfg.to_hf())


def to_hf(model: DinoViT, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Writes a folder that `ViTModel.from_pretrained` loads with no missing or unexpected keys (with
    `add_pooling_layer` as the model has a pooler)."""
    export_module(model, layout(model), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
