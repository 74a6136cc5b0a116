"""CLIP: `transformers` checkpoints <-> our `CLIP` (either tower or both).

One key table; each tower's prefix is found from the keys (its anchor key's prefix), the projections and
`logit_scale` sit beside the towers:
    CLIPModel                           text_model.  vision_model.  text_projection  visual_projection  logit_scale
    CLIPTextModel / CLIPVisionModel     "" (transformers >= 5) or text_model. / vision_model. (earlier, and SD's)
    CLIP*ModelWithProjection            text_model. / vision_model.  + its projection
    a LLaVA checkpoint's CLIP tower     e.g. model.vision_tower.vision_model.  (pass hf_config= if config.json lacks
                                        a `vision_config`)
Export writes the class the config names with the prefixed layout, which transformers 4 and 5 both load strictly.
Keys outside the loaded towers are ignored; inside them every key must be used (old checkpoints' `position_ids`
buffers excepted).

    python -m convert clip --from-hf HF_DIR --out OUR_DIR
    python -m convert clip --to-hf OUR_DIR --out HF_DIR
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from genllava_jax.models.clip import CLIP, CLIPConfig

from .common import CONV, COPY, FLAT, LINEAR, ConversionError, Layout, Linear, Rule, Source, TensorReader, load_state, \
    read_json
from .stream import export_module

ANCHORS = {"text": "embeddings.token_embedding.weight", "vision": "embeddings.patch_embedding.weight"}
TOWER_PREFIX = {"text": "text_model.", "vision": "vision_model."}
PROJECTION = {"text": "text_projection", "vision": "visual_projection"}
L = "encoder.layers.{i}."


def tower_rules(tower: str) -> tuple[Rule, ...]:
    """The rules of one tower, HF keys relative to its prefix."""
    t = tower + "/"
    own = {
        "text": (Rule(ANCHORS["text"], t + "token_embed/embedding", COPY),
                 Rule("embeddings.position_embedding.weight", t + "pos_embed", COPY),
                 Rule("final_layer_norm.weight", t + "final_norm/scale", COPY),
                 Rule("final_layer_norm.bias", t + "final_norm/bias", COPY)),
        "vision": (Rule("embeddings.class_embedding", t + "class_embed", COPY),
                   Rule(ANCHORS["vision"], t + "patch_embed/kernel", CONV),
                   Rule("embeddings.position_embedding.weight", t + "pos_embed", COPY),
                   Rule("pre_layrnorm.weight", t + "pre_norm/scale", COPY),  # sic: HF's name
                   Rule("pre_layrnorm.bias", t + "pre_norm/bias", COPY),
                   Rule("post_layernorm.weight", t + "post_norm/scale", COPY),
                   Rule("post_layernorm.bias", t + "post_norm/bias", COPY)),
    }[tower]
    lt = t + "layers/"
    return own + (
        *(Rule(L + f"layer_norm{n}.{w}", lt + f"norm{n}/{o}", COPY)
          for n in (1, 2) for w, o in (("weight", "scale"), ("bias", "bias"))),
        *(Rule(L + f"self_attn.{p}_proj.{w}", lt + f"attn/{p}/{o}", tr)
          for p in "qkv" for w, o, tr in (("weight", "kernel", LINEAR), ("bias", "bias", FLAT))),
        Rule(L + "self_attn.out_proj.weight", lt + "attn/o/kernel", Linear(n_in=2)),
        Rule(L + "self_attn.out_proj.bias", lt + "attn/o/bias", COPY),
        *(Rule(L + f"mlp.{fc}.{w}", lt + f"mlp/{fc}/{o}", tr)
          for fc in ("fc1", "fc2") for w, o, tr in (("weight", "kernel", LINEAR), ("bias", "bias", COPY))),
    )


def rules(cfg: CLIPConfig, prefixes: dict[str, str]) -> tuple[Rule, ...]:
    """The table for the towers in `prefixes` (tower -> its prefix), their projections and the logit scale."""
    out = []
    for tower, prefix in prefixes.items():
        out += [Rule(prefix + r.hf, r.ours, r.transform) for r in tower_rules(tower)]
        if cfg.projection_dim:
            out.append(Rule(root(prefix, tower) + PROJECTION[tower] + ".weight", PROJECTION[tower] + "/kernel",
                            LINEAR))
    if cfg.has_logit_scale:
        out.append(Rule(root(prefixes["text"], "text") + "logit_scale", "logit_scale", COPY))
    return tuple(out)


def root(prefix: str, tower: str) -> str:
    """Where a tower's projection lives: beside `text_model.` / `vision_model.`."""
    return prefix.removesuffix(TOWER_PREFIX[tower])


def find_prefixes(keys, towers) -> dict[str, str]:
    out = {}
    for tower in towers:
        anchor = ANCHORS[tower]
        found = sorted({k[:-len(anchor)] for k in keys if k.endswith(anchor) and k[:-len(anchor)][-1:] in ("", ".")})
        if len(found) != 1:
            raise ConversionError(f"CLIP {tower} tower: expected one key ending in {anchor!r}, found prefixes "
                                  f"{found}; pass prefixes={{'{tower}': ...}}")
        out[tower] = found[0]
    return out


def hf_source(path, *, towers=None, prefixes: dict[str, str] | None = None, hf_config: dict | None = None,
              **overrides) -> Source:
    """CLIP in a HF folder: both towers of a CLIPModel (or only `towers`, e.g. ("text",)), or the one tower of a
    CLIPTextModel / CLIPVisionModel (+ WithProjection). `overrides` set config fields (dtype, remat, ...)."""
    path = Path(path)
    hf = hf_config if hf_config is not None else read_json(path / "config.json")
    try:
        cfg = CLIPConfig.from_hf(hf, **overrides)
    except ValueError as e:
        raise ConversionError(f"{path / 'config.json'}: {e}") from None
    if towers is not None:
        unknown = set(towers) - {"text", "vision"}
        if unknown or not towers:
            raise ValueError(f"towers={towers!r}: choose from 'text', 'vision'")
        missing = [t for t in towers if getattr(cfg, t) is None]
        if missing:
            raise ConversionError(f"{path}: a {cfg.hf_class} has no {missing[0]} tower")
        cfg = cfg.replace(text=cfg.text if "text" in towers else None,
                          vision=cfg.vision if "vision" in towers else None)
    reader = TensorReader(path)
    loaded = [t for t in ("text", "vision") if getattr(cfg, t) is not None]
    prefixes = {**find_prefixes(reader.keys(), [t for t in loaded if t not in (prefixes or {})]), **(prefixes or {})}
    table = rules(cfg, prefixes)
    wanted = {r.hf for r in table if not r.stacked}

    def ignore(k):  # not ours: the other tower, heads we do not load; old checkpoints' position_ids buffers
        inside = any(k.startswith(p) for p in prefixes.values()) and k not in (
            [root(p, t) + n for t, p in prefixes.items() for n in (PROJECTION[t] + ".weight", "logit_scale")])
        return k.endswith("position_ids") or not (inside or k in wanted)

    abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    return Source(reader, table, abstract, ignore)


def from_hf(path, mesh=None, *, towers=None, prefixes: dict[str, str] | None = None, hf_config: dict | None = None,
            **overrides) -> CLIP:
    """Loads CLIP from a HF folder (see `hf_source`)."""
    return load_state(hf_source(path, towers=towers, prefixes=prefixes, hf_config=hf_config, **overrides), mesh)


def layout(model: CLIP) -> Layout:
    """The HF class the config names (`cfg.hf_class`), with the prefixed layout."""
    cfg = model.cfg
    prefixes = {t: TOWER_PREFIX[t] for t in ("text", "vision") if getattr(cfg, t) is not None}
    return Layout(rules(cfg, prefixes), cfg.to_hf())


def to_hf(model: CLIP, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Writes the HF class the config names (`cfg.hf_class`), loadable with no missing or unexpected keys."""
    export_module(model, layout(model), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
