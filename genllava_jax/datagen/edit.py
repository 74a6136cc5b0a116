"""Public generation and editing sets -> GVIT `t2i` and `edit` records, with varied instruction templates, so the
GenLLaVA mixture can be assembled from them (no model involved).

Editing triplets (source image, instruction, edited image):
    a JSON list or JSONL of {source | source_img | input_image | original_image, instruction | edit | edit_prompt,
    target | target_img | output_image | edited_image, optional output_caption | edited_prompt | target_caption |
    caption, optional id}, image paths relative to --images (default: the file's folder); or
    InstructPix2Pix's generated folders: every folder holding prompt.json ({input, edit, output}) and <seed>_0.jpg /
    <seed>_1.jpg pairs (before / after) is one triplet per seed.
Text-image pairs:
    COCO captions JSON (images + annotations with captions; --per_image captions of each image); a JSON list or JSONL
    of {caption | text | prompt, image | file_name | path, optional id}; or an img2dataset folder (x.jpg + x.txt).

The user turn is a template drawn per record (seeded by its id) from configs/datagen/edit_templates.toml, filled
with {caption} / {instruction} (as given, stripped) or {caption_lc} / {instruction_lc} (first letter lower-case, no
final period). The assistant's text is empty: the answer is the image tokens. A missing image is filtered
(missing_image); image paths are written relative to the output file.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from genllava_jax import errors
from genllava_jax.datagen.llava import relative
from genllava_jax.datagen.output import Output
from genllava_jax.data.tokenizer import IMAGE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SOURCE = ("source", "source_img", "input_image", "original_image")
INSTRUCTION = ("instruction", "edit", "edit_prompt")
TARGET = ("target", "target_img", "output_image", "edited_image")
TARGET_CAPTION = ("output_caption", "edited_prompt", "target_caption", "caption")
CAPTION = ("caption", "text", "prompt")
PICTURE = ("image", "file_name", "path")


def _first(rec: dict, names, where: str, required: bool = True):
    for n in names:
        if isinstance(rec.get(n), str) and rec[n].strip():
            return rec[n].strip()
    if required:
        raise errors.BadValue(f"{where}: none of the keys {list(names)}; it has {sorted(rec)}")
    return None


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSON list or JSONL file."""
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    yield f"{path}:{n + 1}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise errors.BadValue(f"{path}:{n + 1}: not JSON: {e}") from None
        return
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise errors.BadValue(f"{path}: not JSON: {e}") from None
    if not isinstance(data, list):
        raise errors.BadValue(f"{path}: expected a JSON list of records (or JSONL)")
    yield from ((f"{path}: [{n}]", r) for n, r in enumerate(data))


def read_triplets(src, images=None) -> list[dict]:
    """[{id, source, instruction, target, caption}] with absolute image paths (see the module docstring)."""
    src = Path(src)
    if src.is_dir():
        return _ip2p_folders(src)
    if not src.is_file():
        raise errors.MissingFile(f"--src={src}: no such file or folder")
    root, out = Path(images) if images else src.parent, []
    for n, (where, r) in enumerate(_rows(src)):
        if not isinstance(r, dict):
            raise errors.BadValue(f"{where}: expected a JSON object")
        out.append({"id": str(r.get("id", n)), "source": str(root / _first(r, SOURCE, where)),
                    "instruction": _first(r, INSTRUCTION, where), "target": str(root / _first(r, TARGET, where)),
                    "caption": _first(r, TARGET_CAPTION, where, required=False)})
    return out


def _ip2p_folders(root: Path) -> list[dict]:
    out = []
    for prompt in sorted(root.rglob("prompt.json")):
        where = str(prompt)
        try:
            p = json.loads(prompt.read_text())
        except json.JSONDecodeError as e:
            raise errors.BadValue(f"{where}: not JSON: {e}") from None
        folder = prompt.parent
        for before in sorted(folder.glob("*_0.jpg")):
            after = before.with_name(before.name.removesuffix("_0.jpg") + "_1.jpg")
            seed = before.name.removesuffix("_0.jpg")
            out.append({"id": f"{folder.relative_to(root).as_posix()}/{seed}", "source": str(before),
                        "instruction": _first(p, INSTRUCTION, where), "target": str(after),
                        "caption": _first(p, ("output",) + TARGET_CAPTION, where, required=False)})
    if not out:
        raise errors.BadValue(f"--src={root}: no InstructPix2Pix folders (prompt.json with <seed>_0.jpg/_1.jpg)")
    return out


def read_pairs(src, images=None, per_image: int = 1) -> list[dict]:
    """[{id, image, caption}] with absolute image paths (see the module docstring)."""
    src = Path(src)
    if src.is_dir():  # img2dataset: x.jpg beside x.txt
        out = [{"id": p.relative_to(src).with_suffix("").as_posix(), "image": str(p),
                "caption": p.with_suffix(".txt").read_text().strip()}
               for p in sorted(src.rglob("*"))
               if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()]
        if not out:
            raise errors.BadValue(f"--src={src}: no image files with a .txt caption beside them")
        return out
    if not src.is_file():
        raise errors.MissingFile(f"--src={src}: no such file or folder")
    root = Path(images) if images else src.parent
    if src.suffix == ".json":
        data = json.loads(src.read_text())
        if isinstance(data, dict) and "annotations" in data:  # COCO captions
            files = {im["id"]: im["file_name"] for im in data.get("images", [])}
            taken: dict = {}
            out = []
            for n, a in enumerate(data["annotations"]):
                where = f"{src}: annotations[{n}]"
                if a.get("image_id") not in files:
                    raise errors.BadValue(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
                taken[a["image_id"]] = taken.get(a["image_id"], 0) + 1
                if taken[a["image_id"]] <= per_image:
                    out.append({"id": str(a.get("id", n)), "image": str(root / files[a["image_id"]]),
                                "caption": _first(a, ("caption",), where)})
            return out
    out = []
    for n, (where, r) in enumerate(_rows(src)):
        if not isinstance(r, dict):
            raise errors.BadValue(f"{where}: expected a JSON object")
        out.append({"id": str(r.get("id", n)), "image": str(root / _first(r, PICTURE, where)),
                    "caption": _first(r, CAPTION, where)})
    return out


def load_templates(path) -> dict[str, list[str]]:
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise errors.MissingFile(f"{path}: no such template file")
    t = tomllib.loads(path.read_text())
    for task, field in (("t2i", "caption"), ("edit", "instruction")):
        lst = t.get(task)
        if not isinstance(lst, list) or not lst or not all(isinstance(x, str) for x in lst):
            raise errors.BadValue(f"{path}: `{task}` must be a non-empty list of templates")
        for x in lst:
            try:
                x.format(**{field: "", f"{field}_lc": ""})
            except (KeyError, IndexError, ValueError) as e:
                raise errors.BadValue(f"{path}: template {x!r}: {e!r}; it may name {{{field}}}, {{{field}_lc}}") \
                    from None
    return {"t2i": t["t2i"], "edit": t["edit"]}


def _lc(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:]


def _fill(templates: list[str], key: str, field: str, value: str) -> str:
    return random.Random(key).choice(templates).format(**{field: value.strip(), f"{field}_lc": _lc(value)})


def make(kind: str, rows: list[dict], templates: dict[str, list[str]], out: Output, progress: bool = True) -> dict:
    """Writes a `t2i` record for each pair (kind "t2i") or an `edit` record for each triplet (kind "edit")."""
    todo = [r for r in rows if r["id"] not in out.done]
    if len({r["id"] for r in rows}) != len(rows):
        raise errors.BadValue("the input has duplicate ids; give each record a distinct `id`")
    images = ("image",) if kind == "t2i" else ("source", "target")
    for r in tqdm(todo, desc=f"{kind} {out.path.name}", unit="rec", disable=not progress, file=sys.stderr):
        missing = [r[k] for k in images if not Path(r[k]).is_file()]
        if missing:
            out.reject(r["id"], "missing_image", ", ".join(missing))
            continue
        if kind == "t2i":
            turn = _fill(templates["t2i"], r["id"], "caption", r["caption"])
            rec = {"id": r["id"], "task": "t2i", "target_image": relative(r["image"], out.base_dir),
                   "caption": r["caption"]}
        else:
            turn = f"{IMAGE}\n" + _fill(templates["edit"], r["id"], "instruction", r["instruction"])
            rec = {"id": r["id"], "task": "edit", "image": relative(r["source"], out.base_dir),
                   "target_image": relative(r["target"], out.base_dir)}
            if r.get("caption"):
                rec["caption"] = r["caption"]
        rec["conversations"] = [{"from": "human", "value": turn}, {"from": "gpt", "value": ""}]
        out.keep(rec)
    return out.checkpoint()
