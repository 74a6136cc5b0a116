"""COCO-format annotations -> the symbolic context a text-only LLM reads in place of the image (LLaVA's recipe).

An image's context is its captions, one a line, a blank line, then its boxes as `name: [x1, y1, x2, y2]`, the
corners divided by the image's width and height (so in [0, 1]) with three decimals, in annotation order:

    A man rides a red bicycle down a street.
    A cyclist passes parked cars.

    person: [0.312, 0.120, 0.580, 0.911]
    bicycle: [0.288, 0.455, 0.640, 0.986]

Captions come from a `captions_*.json` file (annotations with `caption`), boxes from an `instances_*.json` file
(annotations with `bbox` = [x, y, width, height] in pixels and `category_id`, and its `categories`); either may be
left out, and one file holding both kinds works too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from genllava_jax import errors


@dataclasses.dataclass(frozen=True)
class Entry:
    image_id: int | str
    file_name: str
    width: int
    height: int
    captions: tuple[str, ...]
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...]  # (category name, normalised x1 y1 x2 y2)


def _load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise errors.MissingFile(f"{path}: no such annotation file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise errors.BadValue(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise errors.BadValue(f"{path}: not a COCO annotation file (no 'images' list)")
    return data


def read(captions=None, instances=None) -> list[Entry]:
    """Every image with a caption or a box, in the order of the first file's `images`."""
    if captions is None and instances is None:
        raise errors.BadValue("give a COCO captions file, an instances file, or both")
    files = [(p, _load(p)) for p in (captions, instances) if p is not None]
    images: dict = {}
    for path, data in files:
        for n, im in enumerate(data["images"]):
            try:
                images.setdefault(im["id"], (im["file_name"], int(im["width"]), int(im["height"])))
            except (KeyError, TypeError, ValueError):
                raise errors.BadValue(f"{path}: images[{n}] needs id, file_name, width and height") from None
    caps: dict = {i: [] for i in images}
    boxes: dict = {i: [] for i in images}
    for path, data in files:
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        for n, a in enumerate(data.get("annotations", [])):
            where = f"{path}: annotations[{n}]"
            if a.get("image_id") not in images:
                raise errors.BadValue(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
            if "caption" in a:
                caps[a["image_id"]].append(" ".join(str(a["caption"]).split()))
            elif "bbox" in a:
                if a.get("category_id") not in names:
                    raise errors.BadValue(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
                boxes[a["image_id"]].append((names[a["category_id"]], _normalise(a["bbox"], *images[a["image_id"]][1:],
                                                                                  where)))
    return [Entry(i, f, w, h, tuple(caps[i]), tuple(boxes[i])) for i, (f, w, h) in images.items()
            if caps[i] or boxes[i]]


def _normalise(bbox, width: int, height: int, where: str) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise errors.BadValue(f"{where}: bbox must be [x, y, width, height], got {bbox!r}") from None
    if width <= 0 or height <= 0:
        raise errors.BadValue(f"{where}: its image has size {width}x{height}")
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731  boxes a pixel over the edge
    return clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height)


def context(entry: Entry) -> str:
    """Captions, a blank line, boxes (see the module docstring)."""
    lines = list(entry.captions)
    if entry.boxes:
        lines += ([""] if lines else []) + [f"{name}: [{', '.join(f'{v:.3f}' for v in box)}]"
                                           for name, box in entry.boxes]
    return "\n".join(lines)
