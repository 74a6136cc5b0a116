"""Generation and editing benchmarks: their files, the encoders their metrics need, and the metrics.

    t2i   captions: COCO-captions JSON ({"annotations": [{id, image_id, caption}]}) or JSONL of {"prompt" | "caption"
          | "text", "id"?}; an optional folder of reference images for FID. The prompt is the caption in `template`.
    edit  a MagicBrush-style JSON list or JSONL of {source | source_img, instruction, target | target_img,
          caption | target_caption | output_caption?, id?}, image paths relative to an image folder.

Metrics of the generated images (uint8 arrays, by item key; an item whose answer did not ask for an image has
none). Each needs its encoder (`Encoders`); one whose encoder is not given is left out:
    t2i:  soi_rate (answers ending in [SOI]), images, clip_score (100 x CLIP cosine to the caption, torchmetrics'
          rule), fid (pytorch-fid's Inception pool3 vs the reference folder), clip_fid (the same on CLIP image
          features, when asked)
    edit: soi_rate, images, and as MagicBrush's image_eval.py: l1 and l2 (the generated image resized to the
          target's size, pixels in [0, 1]), clip_i (CLIP cosine to the target image), dino (DINO ViT-S/16 [CLS]
          cosine, its Resize(256) + CenterCrop(224)), clip_t (CLIP cosine to the target caption)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from genllava_jax.evaluate import image_metrics
from genllava_jax.evaluate.readers import Item, _json, _jsonl, _with_keys

IMAGE_BENCHMARKS = ("t2i", "edit")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _first(rec: Mapping, names: Sequence[str], where: str, required: bool = True):
    for n in names:
        if rec.get(n) not in (None, ""):
            return rec[n]
    if required:
        raise ValueError(f"{where}: none of the keys {list(names)}; has {sorted(rec)}")
    return None


def read_t2i(captions, reference=None, template: str = "{}") -> list[Item]:
    """Text-to-image items: prompt = template.format(caption); meta caption, reference (folder or None)."""
    if reference is not None and not Path(reference).is_dir():
        raise ValueError(f"{reference}: the reference image folder does not exist")
    rows = []
    if str(captions).endswith(".json"):
        data = _json(captions)
        if not isinstance(data, dict) or "annotations" not in data:
            raise ValueError(f"{captions}: expected COCO captions ({{'annotations': [...]}}) or a .jsonl of prompts")
        for i, a in enumerate(data["annotations"]):
            where = f"{captions}: annotations[{i}]"
            rows.append((where, a.get("id", i), _first(a, ("caption",), where)))
    else:
        for n, (where, r) in enumerate(_jsonl(captions)):
            rows.append((where, r.get("id", n), _first(r, ("prompt", "caption", "text"), where)))
    items = [Item(qid, template.format(c.strip()), None, (), {"task": "t2i", "caption": c.strip(),
                                                                "reference": None if reference is None else
                                                                str(reference)}, where)
             for where, qid, c in rows]
    return _with_keys(items)


def read_edit(path, image_folder) -> list[Item]:
    """Editing items: prompt = the instruction, image = the source; meta target (path), caption (or None)."""
    recs = _json(path) if str(path).endswith(".json") else [r for _, r in _jsonl(path)]
    if not isinstance(recs, list):
        raise ValueError(f"{path}: expected a JSON list of edits")
    items = []
    for n, r in enumerate(recs):
        where = f"{path}:{n + 1}" if not str(path).endswith(".json") else f"{path}: [{n}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object")
        source = os.path.join(image_folder, _first(r, ("source", "source_img", "input_image"), where))
        target = os.path.join(image_folder, _first(r, ("target", "target_img", "output_image"), where))
        caption = _first(r, ("caption", "target_caption", "output_caption"), where, required=False)
        meta = {"task": "edit", "target": target, "caption": caption}
        items.append(Item(r.get("id", n), _first(r, ("instruction",), where).strip(), source, (), meta, where))
    return _with_keys(items)


READERS = {"t2i": read_t2i, "edit": read_edit}


def load_rgb(path) -> Image.Image:
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} not found")
    return Image.open(path).convert("RGB")


# --- encoders ---------------------------------------------------------------------------------------------------


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear resize along one axis (align_corners=False, no antialias)."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, None)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1, t = np.minimum(i0 + 1, n_in - 1), src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - t)
    np.add.at(m, (np.arange(n_out), i1), t)
    return m


def inception_pixels(image: Image.Image, size: int = 299) -> np.ndarray:
    """(size, size, 3) in [0, 1]: pytorch-fid's ToTensor and its network's bilinear resize, done here so images of
    any size share one compiled network (its own resize of a 299 x 299 input is the identity)."""
    x = np.asarray(image.convert("RGB"), np.float32) / 255
    mh, mw = _linear_matrix(x.shape[0], size), _linear_matrix(x.shape[1], size)
    return np.einsum("hi,wj,ijc->hwc", mh, mw, x).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _features(graphdef, state, args, method):
    return getattr(nnx.merge(graphdef, state), method)(*args).astype(jnp.float32)


def _model(path, converter):
    """Our converted folder (config.json + params/) or the original checkpoint, converted in memory."""
    from genllava_jax import checkpoint

    return checkpoint.load_module(path) if (Path(path) / "params").is_dir() else converter.from_hf(path)


@dataclasses.dataclass
class Encoders:
    """The metrics' optional encoders, each run jitted on fixed batches of `batch` rows (one compile each)."""

    clip: nnx.Module | None = None
    clip_tokenizer: object = None
    inception: nnx.Module | None = None
    dino: nnx.Module | None = None
    batch: int = 16

    @classmethod
    def load(cls, clip=None, inception=None, dino=None, batch: int = 16) -> "Encoders":
        """clip: a transformers CLIP folder (with its tokenizer); inception: pytorch-fid's .pth or our converted
        folder; dino: a ViTModel folder (facebook/dino-vits16) or ours."""
        from genllava_jax import converter

        clip_conv, dino_conv, inception_conv = (converter(n) for n in ("clip", "dino", "inception"))
        from genllava_jax.data.tokenizer import load_clip_tokenizer

        return cls(clip=None if clip is None else clip_conv.from_hf(clip),
                   clip_tokenizer=None if clip is None else load_clip_tokenizer(clip),
                   inception=None if inception is None else _model(inception, inception_conv),
                   dino=None if dino is None else _model(dino, dino_conv), batch=batch)

    def _run(self, model, method: str, *arrays: np.ndarray) -> np.ndarray:
        graphdef, state = nnx.split(model)
        n, out = len(arrays[0]), []
        for s in range(0, n, self.batch):
            chunk = [a[s:s + self.batch] for a in arrays]
            pad = self.batch - len(chunk[0])
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c for c in chunk]
            feats = _features(graphdef, state, tuple(map(jnp.asarray, chunk)), method)
            out.append(np.asarray(feats)[:self.batch - pad])
        return np.concatenate(out)

    def clip_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        from genllava_jax.data.image import CLIP, preprocess

        s = self.clip.cfg.vision.image_size
        cfg = dataclasses.replace(CLIP, shortest_edge=s, crop_size=(s, s))
        return self._run(self.clip, "get_image_features", np.stack([preprocess(im, cfg) for im in images]))

    def clip_texts(self, texts: Sequence[str]) -> np.ndarray:
        from genllava_jax.data.tokenizer import clip_tokens

        ids, mask = clip_tokens(self.clip_tokenizer, texts, self.clip.cfg.text.max_position_embeddings)
        return self._run(self.clip, "get_text_features", ids, mask)

    def inception_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._run(self.inception, "__call__", np.stack([inception_pixels(im) for im in images]))

    def dino_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        from genllava_jax.data.image import ImageConfig, preprocess
        from genllava_jax.models.dino import IMAGENET_MEAN, IMAGENET_STD

        s = self.dino.cfg.image_size  # MagicBrush: Resize(256) (bicubic, short side), CenterCrop(224), ImageNet norm
        cfg = ImageConfig(size=None, shortest_edge=s * 8 // 7, crop_size=(s, s), image_mean=IMAGENET_MEAN,
                          image_std=IMAGENET_STD)
        return self._run(self.dino, "features", np.stack([preprocess(im, cfg) for im in images]))


def reference_features(folder, kind: str, enc: Encoders, cache_dir=None) -> np.ndarray:
    """Features (`kind`: inception or clip) of every image in `folder`, cached in `cache_dir` by folder, file list,
    sizes and modification times."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"{folder}: FID needs at least 2 reference images, found {len(files)}")
    sig = hashlib.sha1(json.dumps([kind, str(Path(folder).resolve())] + [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"reference_{kind}_{sig}.npy"
    if path is not None and path.exists():
        return np.load(path)
    images = [load_rgb(p) for p in files]
    feats = enc.inception_features(images) if kind == "inception" else enc.clip_images(images)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, feats)
        os.replace(tmp, path)
    return feats


# --- metrics ----------------------------------------------------------------------------------------------------


def _made(items, images: Mapping[str, np.ndarray | None]):
    return [it for it in items if images.get(it.key) is not None]


def t2i_metrics(items: Sequence[Item], images: Mapping[str, np.ndarray | None], emitted: Mapping[str, bool],
                enc: Encoders, *, clip_fid: bool = False, cache_dir=None) -> dict[str, float]:
    made = _made(items, images)
    out = {"soi_rate": float(np.mean([bool(emitted[it.key]) for it in items])), "images": float(len(made))}
    if not made:
        return out
    pil = [Image.fromarray(images[it.key]) for it in made]
    if enc.clip is not None:
        out["clip_score"] = image_metrics.clip_score(enc.clip_images(pil), enc.clip_texts(
            [it.meta["caption"] for it in made]))
    ref = made[0].meta.get("reference")
    if ref is not None and len(made) >= 2:
        if enc.inception is not None:
            out["fid"] = image_metrics.fid(enc.inception_features(pil),
                                           reference_features(ref, "inception", enc, cache_dir))
        if clip_fid and enc.clip is not None:
            out["clip_fid"] = image_metrics.fid(enc.clip_images(pil), reference_features(ref, "clip", enc, cache_dir))
    return out


def edit_metrics(items: Sequence[Item], images: Mapping[str, np.ndarray | None], emitted: Mapping[str, bool],
                 enc: Encoders) -> dict[str, float]:
    made = _made(items, images)
    out = {"soi_rate": float(np.mean([bool(emitted[it.key]) for it in items])), "images": float(len(made))}
    if not made:
        return out
    gen = [Image.fromarray(images[it.key]) for it in made]
    tgt = [load_rgb(it.meta["target"]) for it in made]
    l1, l2 = [], []
    for g, t in zip(gen, tgt):  # MagicBrush: the generated image resized to the target's size (PIL's default)
        d = np.asarray(g.resize(t.size), np.float32) / 255 - np.asarray(t, np.float32) / 255
        l1.append(np.abs(d).mean())
        l2.append((d * d).mean())
    out["l1"], out["l2"] = float(np.mean(l1)), float(np.mean(l2))
    if enc.clip is not None:
        g_feats = enc.clip_images(gen)
        out["clip_i"] = image_metrics.dino_score(g_feats, enc.clip_images(tgt))
        with_caption = [i for i, it in enumerate(made) if it.meta.get("caption")]
        if with_caption:
            out["clip_t"] = image_metrics.dino_score(g_feats[with_caption], enc.clip_texts(
                [made[i].meta["caption"] for i in with_caption]))
    if enc.dino is not None:
        out["dino"] = image_metrics.dino_score(enc.dino_features(gen), enc.dino_features(tgt))
    return out
