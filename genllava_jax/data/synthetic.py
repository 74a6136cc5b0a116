"""A deterministic world of coloured shapes for the demo: one crisp shape per image, generated from a seed.

    from genllava_jax.data import synthetic
    paths = synthetic.make_synthetic("runs/demo/data", num_train=4000, num_eval=200)

A scene is (colour, kind, size, position, background): 6·3·2·5·3 = 540 of them. Eval records show and draw only
held-out scenes (one in five, chosen by the seed), train records only the others. Each scene is rendered in
`variants` versions, nudged, resized and tinted a little (variant 0 is the exact one), so that a model must read the
attributes rather than memorise a few hundred exact images; an edit keeps its source's variant. `judge` is the
pixel-statistics classifier that scores generated images.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from genllava_jax.data.tokenizer import IMAGE, train_tokenizer

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40),
           "purple": (150, 60, 190), "orange": (250, 140, 30)}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.24}  # half extent, in image widths
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}  # centre (x, y), in image widths
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
TASK_MIX = dict(i2t=0.45, t2i=0.3, edit=0.2, text=0.05)


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    kind: str
    size: str
    position: str
    background: str

    @property
    def name(self) -> str:
        return "_".join(dataclasses.astuple(self))

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {WHERE[self.position]}"

    @property
    def full_caption(self) -> str:
        """Everything in the image: the records' `caption` (for the optional alignment loss)."""
        return f"{self.caption} on a {self.background} background"


ALL_SCENES = [Scene(*s) for s in itertools.product(COLOURS, KINDS, SIZES, POSITIONS, BACKGROUNDS)]
# a variant's largest nudge (image widths), resize and tint (per RGB channel): small enough that every attribute
# stays unambiguous to `judge` and to a reader (positions are 0.23 apart, sizes 0.08, colours >= 100 in RGB)
NUDGE, RESIZE, TINT = 0.03, 0.08, 12


def variation(variant: int) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    """(dx, dy, size factor, shape tint, background tint) of a variant: the same for every scene."""
    if variant == 0:
        return 0.0, 0.0, 1.0, np.zeros(3), np.zeros(3)
    rng = random.Random(f"variant {variant}")
    dx, dy, factor = rng.uniform(-NUDGE, NUDGE), rng.uniform(-NUDGE, NUDGE), 1 + rng.uniform(-RESIZE, RESIZE)
    tints = np.array([rng.randint(-TINT, TINT) for _ in range(6)])
    return dx, dy, factor, tints[:3], tints[3:]


def image_name(scene: Scene, variant: int = 0) -> str:
    return f"images/{scene.name}_{variant}.png"


def scene_of(name: str) -> Scene:
    """The scene an image path from `image_name` shows."""
    return Scene(*Path(name).stem.split("_")[:5])


def variant_of(name: str) -> int:
    """The variant an image path from `image_name` shows."""
    return int(Path(name).stem.rsplit("_", 1)[1])


def render(scene: Scene, size: int = 32, variant: int = 0) -> np.ndarray:
    """(size, size, 3) uint8; no anti-aliasing: a pixel is the shape's colour iff its centre is inside."""
    y, x = (np.mgrid[:size, :size] + 0.5) / size
    nudge_x, nudge_y, factor, tint, bg_tint = variation(variant)
    (cx, cy), r = POSITIONS[scene.position], SIZES[scene.size] * factor
    cx, cy = cx + nudge_x, cy + nudge_y
    dx, dy = np.abs(x - cx), y - cy
    if scene.kind == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif scene.kind == "square":
        inside = (dx <= r) & (np.abs(dy) <= r)
    else:  # apex up: the half width grows from 0 at the top to r at the base, filling half its box
        inside = (np.abs(dy) <= r) & (dx <= (dy + r) / 2)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = np.clip(np.add(BACKGROUNDS[scene.background], bg_tint), 0, 255)
    image[inside] = np.clip(np.add(COLOURS[scene.colour], tint), 0, 255)
    return image


def judge(image: np.ndarray, background=None, threshold: float = 48.0) -> tuple[str | None, str | None]:
    """(colour, kind) of the shape in a uint8 (H, W, 3) image, or (None, None) if nothing stands out.

    Foreground: pixels farther than `threshold` (RGB distance) from the background, which is given (a name or an
    RGB triple) or the median border pixel. Colour: the palette colour nearest the foreground's median. Kind: the
    foreground's share of its bounding box (square 1, circle π/4, triangle 1/2). Exact on every scene rendered at
    32 px or more; at 16 px small triangles and circles blur together.
    """
    x = np.asarray(image, np.float32)
    if background is None:
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        bg = np.median(border, axis=0)
    else:
        bg = np.asarray(BACKGROUNDS.get(background, background), np.float32)
    fg = np.linalg.norm(x - bg, axis=-1) > threshold
    if fg.sum() < 3:
        return None, None
    median = np.median(x[fg], axis=0)
    names = list(COLOURS)
    colour = names[np.argmin([np.linalg.norm(median - np.asarray(COLOURS[c])) for c in names])]
    rows, cols = np.nonzero(fg.any(1))[0], np.nonzero(fg.any(0))[0]
    fill = fg.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    return colour, "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


# --- records ------------------------------------------------------------------------------------------------

QUESTIONS = [("Describe the image.", lambda s: s.caption), ("What colour is the shape?", lambda s: s.colour),
             ("What shape is it?", lambda s: s.kind), ("Where is the shape?", lambda s: s.position),
             ("Is the shape small or large?", lambda s: s.size),
             ("What colour is the background?", lambda s: s.background)]
FACTS = [("What colours are there?", "red, green, blue, yellow, purple and orange"),
         ("What shapes are there?", "circle, square and triangle"), ("What sizes are there?", "small and large"),
         ("Where can a shape be?", "left, right, top, bottom or center"),
         ("How many colours are there?", "six"), ("How many shapes are there?", "three")]
FACTS += [(f"Is {c} a colour?", "yes") for c in COLOURS] + [(f"Is {k} a colour?", "no, it is a shape") for k in KINDS]


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def i2t_record(rng: random.Random, scene: Scene, variant: int) -> dict:
    """Two questions about the image (reading a shape's kind and place takes many answers); the first turn carries
    the image."""
    qa = rng.sample(QUESTIONS, 2)
    turns = [t for q, answer in qa for t in (q, answer(scene))]
    turns[0] = f"{IMAGE}\n{turns[0]}"
    return dict(task="i2t", image=image_name(scene, variant), conversations=_conv(*turns),
                meta={"scene": dataclasses.asdict(scene)})


def t2i_record(rng: random.Random, scene: Scene, variant: int) -> dict:
    prompt = rng.choice([f"Draw a {scene.colour} {scene.kind}.", f"Generate an image of {scene.caption}.",
                         f"Draw {scene.full_caption}."])
    return dict(task="t2i", target_image=image_name(scene, variant), caption=scene.full_caption,
                conversations=_conv(prompt, ""), meta={"scene": dataclasses.asdict(scene)})


def edit_record(rng: random.Random, scene: Scene, variant: int) -> dict:
    """The source image and an instruction changing one attribute; the target differs only in it."""
    attribute = rng.choice(("colour", "kind", "position", "size"))
    values = {"colour": COLOURS, "kind": KINDS, "position": POSITIONS, "size": SIZES}[attribute]
    new = rng.choice([v for v in values if v != getattr(scene, attribute)])
    target = dataclasses.replace(scene, **{attribute: new})
    instruction = {"colour": f"Make it {new}.", "kind": f"Turn it into a {new}.",
                   "position": f"Move it to the {new}.",
                   "size": "Make it larger." if new == "large" else "Make it smaller."}[attribute]
    return dict(task="edit", image=image_name(scene, variant), target_image=image_name(target, variant),
                caption=target.full_caption,
                conversations=_conv(f"{IMAGE}\n{instruction}", ""),
                meta={"source": dataclasses.asdict(scene), "target": dataclasses.asdict(target),
                      "attribute": attribute})


def text_record(rng: random.Random, scene: Scene, variant: int) -> dict:
    del scene, variant
    return dict(task="text", conversations=_conv(*(t for qa in rng.sample(FACTS, rng.choice((1, 2))) for t in qa)))


GENERATORS = {"i2t": i2t_record, "t2i": t2i_record, "edit": edit_record, "text": text_record}


def make_record(rng: random.Random, task: str, scenes: list[Scene], allowed: set[Scene],
                variants: int = 1) -> dict:
    """A record of `task` showing a scene from `scenes` in one of `variants`; an edit's target must be `allowed`."""
    while True:
        record = GENERATORS[task](rng, rng.choice(scenes), rng.randrange(variants))
        if task != "edit" or Scene(**record["meta"]["target"]) in allowed:
            return record


def make_records(rng: random.Random, scenes: list[Scene], n: int, mix: dict[str, float], prefix: str,
                 variants: int = 1) -> list[dict]:
    tasks = rng.choices(list(mix), weights=list(mix.values()), k=n)
    allowed = set(scenes)
    return [{"id": f"{prefix}-{i:06d}", **make_record(rng, t, scenes, allowed, variants)}
            for i, t in enumerate(tasks)]


def make_synthetic(out_dir: str | Path, num_train: int = 4000, num_eval: int = 200, image_size: int = 32,
                   seed: int = 0, num_img_tokens: int = 16, mix: dict[str, float] | None = None,
                   variants: int = 1) -> dict[str, Path]:
    """Writes train.jsonl, eval.jsonl, images/*.png and tokenizer/ under out_dir; the same bytes for the same args.
    `variants`: renderings per scene (1: the exact scene only)."""
    mix = dict(mix or TASK_MIX)
    if unknown := set(mix) - set(GENERATORS):
        raise ValueError(f"mix has unknown tasks {sorted(unknown)}; known: {sorted(GENERATORS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = rng.sample(ALL_SCENES, len(ALL_SCENES))
    eval_scenes, train_scenes = scenes[::5], [s for i, s in enumerate(scenes) if i % 5]
    splits = {"train": make_records(rng, train_scenes, num_train, mix, "train", variants),
              "eval": make_records(rng, eval_scenes, num_eval, mix, "eval", variants)}
    names = set()
    for split, records in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        names |= {r[k] for r in records for k in ("image", "target_image") if k in r}
    for name in sorted(names):
        Image.fromarray(render(scene_of(name), image_size, variant_of(name))).save(out / name)
    # The template encodes the text around <image> piece by piece, stripped: train on the same pieces.
    texts = [p.strip() for rs in splits.values() for r in rs for c in r["conversations"]
             for p in c["value"].split(IMAGE)]
    texts += [r["caption"] for rs in splits.values() for r in rs if "caption" in r]
    tokenizer = train_tokenizer(texts, out / "tokenizer", num_img_tokens=num_img_tokens, vocab_size=512)
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "images": out / "images", "tokenizer": tokenizer}
