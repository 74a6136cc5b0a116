"""llava-hf `LlavaForConditionalGeneration` folders <-> our understanding half: the vision tower (SigLIP or CLIP),
the projector and the LLM (Mistral or Llama), as three of our part checkpoints.

    python -m convert.llava --from-hf LLAVA_DIR --out OUT    # OUT/vision, OUT/projector, OUT/llm, OUT/llava.json
    python -m convert.llava --to-hf OUT --out LLAVA_DIR      # back to a LlavaForConditionalGeneration folder

A config then starts a GenLLaVA from them with `init.vision=OUT/vision init.projector=OUT/projector
init.llm=OUT/llm`; `to_hf` exports a trained model's understanding half. Both directions stream (`convert.stream`).

Keys: the layout of llava-hf's checkpoints (`vision_tower.vision_model.*`, `multi_modal_projector.linear_1/2.*`,
`language_model.model.*`, `language_model.lm_head.weight`) is written, which transformers 4 and 5 load strictly; it
is read too, and so are transformers 5's own (`vision_tower.*` without `vision_model.`) and the one transformers >= 4.52
builds in memory (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`).
The vision tower's features are LLaVA's: `vision_feature_layer` (one layer) of SigLIP with every patch ("full"), or of
CLIP without its class token ("default"); its pooling head (SigLIP) is not kept. OUT/llava.json holds the LLaVA fields
our parts have no place for (image_token_index, the feature selection, the LLM's model_type) for the way back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from genllava_jax import errors
from genllava_jax.atomic import atomic_write
from genllava_jax.models import abstract_model
from genllava_jax.models.projector import Projector, ProjectorConfig

from . import clip as clip_conv, mistral as mistral_conv, siglip as siglip_conv
from .common import COPY, LINEAR, ConversionError, Layout, Rule, Source, TensorReader, read_json, with_prefix
from .stream import checkpoint_tensors, dtype_name, import_hf, module_tensors, open_checkpoint, write_hf

PROJECTOR = tuple(Rule(f"linear_{n}.{w}", f"{fc}/{o}", t) for n, fc in ((1, "fc1"), (2, "fc2"))
                  for w, o, t in (("weight", "kernel", LINEAR), ("bias", "bias", COPY)))
# the fields of a LLaVA config kept in OUT/llava.json (the parts' own configs hold the rest)
FIELDS = ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "image_seq_length",
          "projector_hidden_act", "multimodal_projector_bias", "text_model_type")


def full_config(path) -> dict:
    """The folder's LLaVA config with every default filled in (llava-hf configs store only what differs)."""
    from transformers import LlavaConfig

    raw = read_json(Path(path) / "config.json")
    if raw.get("model_type") != "llava":
        raise ConversionError(f"{Path(path) / 'config.json'}: model_type={raw.get('model_type')!r}, not 'llava'")
    try:
        return LlavaConfig.from_dict(raw).to_dict()
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{Path(path) / 'config.json'}: not a usable LLaVA config ({e})") from e


def fields(hf: dict, path) -> dict:
    """The LLaVA fields we keep, checked: one feature layer, the selection each tower supports, GELU + biases."""
    out = {k: hf.get(k) for k in FIELDS if k in hf} | {"text_model_type": hf["text_config"]["model_type"]}
    where = Path(path) / "config.json"
    tower = hf["vision_config"]["model_type"]
    want = {"siglip_vision_model": "full", "clip_vision_model": "default"}.get(tower)
    if want is None:
        raise ConversionError(f"{where}: a {tower!r} vision tower; SigLIP and CLIP towers are supported")
    if not isinstance(out["vision_feature_layer"], int):
        raise ConversionError(f"{where}: vision_feature_layer={out['vision_feature_layer']!r}: one layer is "
                              f"supported, not several")
    if out["vision_feature_select_strategy"] != want:
        raise ConversionError(f"{where}: vision_feature_select_strategy={out['vision_feature_select_strategy']!r};"
                              f" a {tower} tower is supported with {want!r}")
    if out["projector_hidden_act"] != "gelu" or not out.get("multimodal_projector_bias", True):
        raise ConversionError(f"{where}: the projector must be Linear (with bias) -> GELU -> Linear")
    if out["text_model_type"] not in ("mistral", "llama"):
        raise ConversionError(f"{where}: a {out['text_model_type']!r} LLM; Mistral and Llama are supported")
    text = hf["text_config"]
    if text.get("attention_bias") or text.get("mlp_bias"):
        raise ConversionError(f"{where}: an LLM with attention_bias or mlp_bias is not supported")
    return out


def _prefixes(reader: TensorReader) -> tuple[str, str, str]:
    """(projector, LLM, LM head key) prefixes of the two layouts (see the module docstring)."""
    if any(k.startswith("model.language_model.") for k in reader.keys()):
        return "model.multi_modal_projector.", "model.language_model.", "lm_head.weight"
    return "multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight"


def _llm_rules(lm: str, head: str):
    """Mistral's table with its `model.` keys under `lm` and its `lm_head.weight` at `head`."""
    return tuple(dataclasses.replace(r, hf=head if r.hf == "lm_head.weight" else lm + r.hf.removeprefix("model."))
                 for r in mistral_conv.RULES)


# ---------------------------------------------------------------------------------------------------------------
# The three parts of a LLaVA folder, each a `Source` for `convert.stream.import_hf`


def vision_source(path, **overrides) -> Source:
    hf = full_config(path)
    fields(hf, path)
    if hf["vision_config"]["model_type"] == "siglip_vision_model":
        overrides = {"use_head": False, "feature_layer": hf["vision_feature_layer"], **overrides}
        return siglip_conv.hf_source(path, hf_config=hf["vision_config"], **overrides)
    return clip_conv.hf_source(path, hf_config=hf["vision_config"], **overrides)


def projector_source(path, **overrides) -> Source:
    hf = full_config(path)
    fields(hf, path)
    reader = TensorReader(path)
    prefix = _prefixes(reader)[0]
    cfg = ProjectorConfig(vision_size=hf["vision_config"]["hidden_size"], text_size=hf["text_config"]["hidden_size"],
                          **overrides)
    return Source(reader, with_prefix(PROJECTOR, prefix), abstract_model(Projector, cfg),
                  lambda k: not k.startswith(prefix))


def llm_source(path, **overrides) -> Source:
    hf = full_config(path)
    fields(hf, path)
    reader = TensorReader(path)
    _, lm, head = _prefixes(reader)
    text = {**hf["text_config"], "tie_word_embeddings": hf["text_config"].get("tie_word_embeddings",
                                                                               hf.get("tie_word_embeddings", False))}
    source = mistral_conv.hf_source(path, hf_config=text, **overrides)
    cfg = source.model.cfg

    def ignore(k):  # the other parts; old RoPE buffers; a tied model's copy of its embedding
        return not (k.startswith(lm) or k == head) or k.endswith("rotary_emb.inv_freq") or (
            cfg.tie_embeddings and k == head)

    return dataclasses.replace(source, rules=_llm_rules(lm, head), ignore=ignore)


def from_hf(path, out, *, dtype: str | None = None, overwrite: bool = False) -> None:
    """Converts a LlavaForConditionalGeneration folder into OUT/{vision,projector,llm} + OUT/llava.json."""
    hf = full_config(path)
    kept = fields(hf, path)
    vision_part = "siglip" if hf["vision_config"]["model_type"] == "siglip_vision_model" else "clip"
    with atomic_write(out, directory=True, overwrite=overwrite) as tmp:
        for name, part, source in (("vision", vision_part, vision_source), ("projector", "projector", projector_source),
                                   ("llm", "mistral", llm_source)):
            import_hf(source, path, tmp / name, part, dtype=dtype)
        (tmp / "llava.json").write_text(json.dumps(kept, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# Export


def layouts(vision, projector, llm, kept: dict) -> tuple[list[Layout], dict]:
    """The three parts' tables in the layout transformers writes, and the LLaVA config.json."""
    if type(vision).__name__ == "SiglipVision":
        v = siglip_conv.layout(vision, prefix="vision_tower.vision_model.")
        strategy = "full"
    else:
        v = clip_conv.layout(vision)
        v = Layout(with_prefix(v.rules, "vision_tower."), v.hf_config)
        strategy = "default"
    text = llm.cfg.to_hf()
    if kept.get("text_model_type") == "llama":
        text = {k: val for k, val in text.items() if k != "sliding_window"} | {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": False, "mlp_bias": False}
    feature_layer = getattr(vision.cfg, "feature_layer", None)
    hf = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
          "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
          "vision_feature_select_strategy": strategy,
          "vision_feature_layer": feature_layer if feature_layer is not None else kept.get("vision_feature_layer", -2),
          **{k: val for k, val in kept.items() if k in ("image_token_index", "image_seq_length")},
          "tie_word_embeddings": llm.cfg.tie_embeddings, "vision_config": v.hf_config, "text_config": text}
    return [v, Layout(with_prefix(PROJECTOR, "multi_modal_projector."), {}),
            Layout(_llm_rules("language_model.model.", "language_model.lm_head.weight"), {})], hf


def to_hf(vision, projector, llm, path, *, image_token_index: int, dtype=None, max_shard_bytes: int = 5 * 2**30,
          overwrite: bool = False, text_model_type: str = "mistral") -> None:
    """Writes in-memory parts (e.g. a GenLLaVA's `vision`, `projector`, `llm`, and its `cfg.image_token_id`) as a
    folder `LlavaForConditionalGeneration.from_pretrained` loads with no missing or unexpected keys."""
    kept = {"image_token_index": image_token_index, "image_seq_length": vision.cfg.grid ** 2,
            "text_model_type": text_model_type}
    parts = (vision, projector, llm)
    lays, hf = layouts(*parts, kept)
    tensors = [t for m, lay in zip(parts, lays) for t in module_tensors(m, lay, dtype)]
    write_hf(path, Layout((), hf), tensors, dtype_name(parts, dtype), max_shard_bytes=max_shard_bytes,
             overwrite=overwrite)


def export_checkpoints(our_dir, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
                       overwrite: bool = False) -> None:
    """OUT/{vision,projector,llm} (+ llava.json) back to a LLaVA folder, read a tensor at a time."""
    our_dir = Path(our_dir)
    opened = [open_checkpoint(our_dir / name, part) for name, part in
              (("vision", None), ("projector", "projector"), ("llm", "mistral"))]
    kept = read_json(our_dir / "llava.json") if (our_dir / "llava.json").exists() else {}
    if "image_token_index" not in kept:
        raise errors.MissingFile(f"{our_dir / 'llava.json'}: needed for image_token_index (written by --from-hf)")
    models = [m for m, _ in opened]
    lays, hf = layouts(*models, kept)
    tensors = [t for (m, reader), lay in zip(opened, lays) for t in checkpoint_tensors(m, reader, lay, dtype)]
    write_hf(path, Layout((), hf), tensors, dtype_name(models, dtype), max_shard_bytes=max_shard_bytes,
             overwrite=overwrite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.llava", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="LLAVA_DIR")
    src.add_argument("--to-hf", metavar="OUR_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="parameter dtype of the output (default: as stored)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard on export")
    p.add_argument("--overwrite", action="store_true")
    errors.add_verbose(p)
    a = p.parse_args(argv)
    src = Path(a.from_hf or a.to_hf)
    if not src.is_dir():
        raise errors.MissingFile(f"--{'from-hf' if a.from_hf else 'to-hf'} {src}: no such folder")
    if a.from_hf:
        from_hf(src, a.out, dtype=a.dtype, overwrite=a.overwrite)
    else:
        export_checkpoints(src, a.out, dtype=a.dtype, max_shard_bytes=int(a.max_shard_size * 2**30),
                           overwrite=a.overwrite)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.guard(main))
