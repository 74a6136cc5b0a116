"""Q-former: `transformers.Blip2QFormerModel` folders, full BLIP-2 checkpoints and our generation head.

    python -m convert qformer --from-hf HF_DIR --out OUR_DIR     # a BLIP-2 checkpoint or our export -> the head
    python -m convert qformer --to-hf OUR_DIR --out HF_DIR       # the head -> config.json + safetensors

Layouts:
- a `Blip2QFormerModel` folder (`model_type: blip_2_qformer`): keys `layernorm.*`, `encoder.layer.N.*` <-> `QFormer`;
- a full BLIP-2 checkpoint (config with `qformer_config`): `qformer.*` + `query_tokens` <-> `QFormerHead`; the vision
  tower, language model and projection keys are ignored. Our head is exported in this layout with its own linears
  under `gen_head.` (`gen_head.in_proj.*`, `gen_head.out_proj.*`) and a `gen_head` entry in config.json.
The query-only forward never uses the text feed-forward (`encoder.layer.N.intermediate.*` / `output.*` of
`use_qformer_text_input` checkpoints), so those keys are ignored on import and not written.
"""

from __future__ import annotations

import re
from pathlib import Path

from flax import nnx

from genllava_jax.models.qformer import QFormer, QFormerConfig, QFormerHead, QFormerHeadConfig

from .common import COPY, FLAT, LINEAR, Layout, Linear, Rule, Source, TensorReader, load_state, read_json
from .stream import export_module


_ATTN = (("attention.query", "q", LINEAR), ("attention.key", "k", LINEAR), ("attention.value", "v", LINEAR),
         ("output.dense", "o", Linear(n_in=2)))


def _linear(hf: str, ours: str, transform, **kw) -> tuple[Rule, Rule]:
    return Rule(f"{hf}.weight", f"{ours}/kernel", transform, **kw), Rule(f"{hf}.bias", f"{ours}/bias", FLAT, **kw)


def _norm(hf: str, ours: str, **kw) -> tuple[Rule, Rule]:
    return Rule(f"{hf}.weight", f"{ours}/scale", COPY, **kw), Rule(f"{hf}.bias", f"{ours}/bias", COPY, **kw)


def qformer_rules(cfg: QFormerConfig, prefix: str = "", ours: str = "") -> tuple[Rule, ...]:
    """The Q-former's table; `prefix` is the HF key prefix ("qformer." in full BLIP-2), `ours` our path prefix.

    Our stacked group i holds HF layers f*i .. f*i+f-1 (f = cross_attention_frequency, the group's first layer is
    the one with cross-attention): slice i of the group's layer j is HF layer f*i + j. The unstacked tail's layer j
    (num_layers % f of them) is HF layer f*G + j, G = the number of full groups.
    """
    f = cfg.cross_attention_frequency
    rules = [*_norm(f"{prefix}layernorm", f"{ours}norm")]
    layers = [(f"{prefix}encoder.layer.{{i}}.", f"{ours}groups/layers/{j}/", j, dict(stride=f, offset=j))
              for j in range(f if cfg.num_groups else 0)]
    layers += [(f"{prefix}encoder.layer.{cfg.num_groups * f + j}.", f"{ours}tail/layers/{j}/", j, {})
               for j in range(cfg.tail_layers)]
    for hf, us, j, kw in layers:
        for block, name in (("attention", "self_attn"), ("crossattention", "cross_attn"))[:2 if j == 0 else 1]:
            for hf_name, our_name, transform in _ATTN:
                rules += _linear(f"{hf}{block}.{hf_name}", f"{us}{name}/{our_name}", transform, **kw)
            rules += _norm(f"{hf}{block}.output.LayerNorm", f"{us}{name}/norm", **kw)
        rules += _linear(f"{hf}intermediate_query.dense", f"{us}fc1", LINEAR, **kw)
        rules += _linear(f"{hf}output_query.dense", f"{us}fc2", LINEAR, **kw)
        rules += _norm(f"{hf}output_query.LayerNorm", f"{us}mlp_norm", **kw)
    return tuple(rules)


def head_rules(cfg: QFormerHeadConfig) -> tuple[Rule, ...]:
    rules = [Rule("query_tokens", "query_tokens", COPY), *qformer_rules(cfg, "qformer.", "qformer/")]
    if cfg.llm_hidden_size != cfg.encoder_hidden_size:
        rules += _linear("gen_head.in_proj", "in_proj", LINEAR)
    if cfg.out_dim is not None:
        rules += _linear("gen_head.out_proj", "out_proj", LINEAR)
    return tuple(rules)


_TEXT_FFN = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.")


def _ignore_bare(key: str) -> bool:
    return bool(_TEXT_FFN.search(key))


def _ignore_full(key: str) -> bool:
    """Everything of a full BLIP-2 checkpoint outside the Q-former and its query tokens, and the text FFN."""
    ours = key == "query_tokens" or key.startswith(("qformer.", "gen_head."))
    return not ours or _ignore_bare(key)


def hf_source(path, **overrides) -> Source:
    """A `Blip2QFormerModel` folder gives a `QFormer`; a full BLIP-2 checkpoint or our export a `QFormerHead`
    (a BLIP-2 checkpoint has no input or output linear unless `overrides` ask for them, which it must then hold).
    `overrides` set config fields (dtype, remat, ...)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    if "qformer_config" in hf:
        cfg = QFormerHeadConfig.from_hf(hf, **overrides)
        model_cls, rules, ignore = QFormerHead, head_rules(cfg), _ignore_full
    else:
        cfg = QFormerConfig.from_hf(hf, **overrides)
        model_cls, rules, ignore = QFormer, qformer_rules(cfg), _ignore_bare
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return Source(TensorReader(path), rules, abstract, ignore)


def from_hf(path, mesh=None, **overrides) -> QFormer | QFormerHead:
    """Loads a Q-former or head (see `hf_source`)."""
    return load_state(hf_source(path, **overrides), mesh)


def layout(model: QFormer | QFormerHead) -> Layout:
    """A `QFormer` is written as a `Blip2QFormerModel` folder; a `QFormerHead` in the full BLIP-2 layout
    (`qformer.*`, `query_tokens`, `gen_head.*`)."""
    rules = head_rules(model.cfg) if isinstance(model, QFormerHead) else qformer_rules(model.cfg)
    return Layout(rules, model.cfg.to_hf())


def to_hf(model: QFormer | QFormerHead, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
          overwrite: bool = False) -> None:
    """Writes a folder `Blip2QFormerModel.from_pretrained` (a `QFormer`) or `convert.torch_genllava.TorchHead`
    (a head) loads strictly."""
    export_module(model, layout(model), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
