"""The synthetic world (data.synthetic) as a data-generation source: COCO-format annotations of its scenes, topics,
and the pixel judge as an image filter."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from PIL import Image

from genllava_jax.data import synthetic


def box(scene: synthetic.Scene, size: int) -> list[float]:
    """The shape's COCO bbox [x, y, width, height] in pixels (variant 0, exact): every kind spans centre ± r."""
    (cx, cy), r = synthetic.POSITIONS[scene.position], synthetic.SIZES[scene.size]
    return [(cx - r) * size, (cy - r) * size, 2 * r * size, 2 * r * size]


def write_coco(out_dir, scenes: Sequence[synthetic.Scene], image_size: int = 32) -> tuple[Path, Path, Path]:
    """(captions JSON, instances JSON, image folder) of the scenes, rendered exactly: what `llava` reads."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    kinds = {k: i + 1 for i, k in enumerate(synthetic.KINDS)}
    images, captions, boxes = [], [], []
    for i, s in enumerate(scenes):
        name = f"{s.name}.png"
        Image.fromarray(synthetic.render(s, image_size)).save(out / "images" / name)
        images.append({"id": i, "file_name": name, "width": image_size, "height": image_size})
        for text in (s.caption, s.full_caption, f"a {s.colour} {s.kind}"):
            captions.append({"id": len(captions), "image_id": i, "caption": text})
        boxes.append({"id": len(boxes), "image_id": i, "category_id": kinds[s.kind], "bbox": box(s, image_size),
                      "iscrowd": 0})
    cats = [{"id": v, "name": k} for k, v in kinds.items()]
    (out / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (out / "instances.json").write_text(json.dumps({"images": images, "annotations": boxes, "categories": cats}))
    return out / "captions.json", out / "instances.json", out / "images"


def topics(scenes: Sequence[synthetic.Scene]) -> list[str]:
    return [s.caption for s in scenes]


def named(text: str) -> tuple[str | None, str | None]:
    """(colour, kind) a text names (the last of each), or None."""
    words = re.findall(r"[a-z]+", text.lower())
    colour = next((w for w in reversed(words) if w in synthetic.COLOURS), None)
    kind = next((w for w in reversed(words) if w in synthetic.KINDS), None)
    return colour, kind


def judge(prompt: str, image, check_kind: bool = False) -> str | None:
    """None if the image shows the colour its prompt names (and, with check_kind, the kind if it names one), by
    `synthetic.judge`; else the reason: judge_unnamed (the prompt names no colour of the world), judge_nothing (no
    shape stands out), judge_colour or judge_kind (the image shows another). The judge reads kinds reliably only
    at 32 px and more, hence check_kind off by default."""
    colour, kind = named(prompt)
    if colour is None:
        return "judge_unnamed"
    seen_colour, seen_kind = synthetic.judge(image)
    if seen_colour is None:
        return "judge_nothing"
    if seen_colour != colour:
        return "judge_colour"
    if check_kind and kind is not None and seen_kind != kind:
        return "judge_kind"
    return None
