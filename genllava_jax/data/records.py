"""GVIT records: LLaVA's JSON conversations plus `task`, `image`, `target_image` and an optional `caption`.

    {"id": "...", "task": "edit", "image": "images/a.png", "target_image": "images/b.png", "caption": "...",
     "conversations": [{"from": "human", "value": "<image>\\nMake it green."}, {"from": "gpt", "value": ""}]}

A data file is a JSON list of such records or JSONL (one a line); image paths are relative to the file's folder.
Roles: human/user, gpt/assistant, and an optional leading system turn (prefixed to the first user turn, as
Mistral has no system role). A missing `task` is inferred from the images present.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from genllava_jax.data.tokenizer import IMAGE

TASKS = ("text", "i2t", "t2i", "edit")  # index = the `task` id in batches
USER, ASSISTANT = ("human", "user"), ("gpt", "assistant")


class BadRecord(ValueError):
    """A record the pipeline skips; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Record:
    turns: tuple[tuple[str, str], ...]  # (user, assistant) pairs
    task: str
    image: str | bytes | None = None  # an absolute path or the encoded file
    target_image: str | bytes | None = None
    caption: str | None = None
    meta: Any = None


def read_records(path: str | Path) -> list[str | dict]:
    """The raw records of a .json or .jsonl file: dicts, or JSONL lines parsed later (so a bad line is one skip)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        return [line for line in path.read_text().splitlines() if line.strip()]
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: a .json data file holds a list of records, got {type(records).__name__}")
    return records


def _image_ref(value, base_dir: Path | None):
    if value is None or isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise BadRecord("malformed", f"image must be a path or bytes, got {type(value).__name__}")
    return str(base_dir / value) if base_dir is not None else value


def _turns(conversations) -> tuple[tuple[str, str], ...]:
    if not isinstance(conversations, list) or not all(isinstance(c, dict) for c in conversations):
        raise BadRecord("malformed", "conversations must be a list of {from, value}")
    msgs = [(c.get("from"), c.get("value")) for c in conversations]
    if any(not isinstance(v, str) for _, v in msgs):
        raise BadRecord("malformed", "every turn needs a string value")
    if msgs and msgs[0][0] == "system" and len(msgs) > 1:
        msgs = [(msgs[1][0], f"{msgs[0][1]}\n\n{msgs[1][1]}")] + msgs[2:]
    if not any(role in ASSISTANT for role, _ in msgs):
        raise BadRecord("no_assistant")
    users, answers = msgs[0::2], msgs[1::2]
    alternate = all(r in USER for r, _ in users) and all(r in ASSISTANT for r, _ in answers)
    if len(users) != len(answers) or not alternate:
        raise BadRecord("bad_turns", f"roles must alternate user/assistant, got {[r for r, _ in msgs]}")
    return tuple((u, a) for (_, u), (_, a) in zip(users, answers))


def as_dict(raw: str | dict) -> dict:
    """A raw record (a dict or a JSON line) as a dict."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRecord("malformed", str(e)) from None
    if not isinstance(raw, dict):
        raise BadRecord("malformed", f"a record is a JSON object, got {type(raw).__name__}")
    return raw


def parse(raw: str | dict, base_dir: Path | None = None) -> Record:
    """A Record from a dict or a JSON line; raises BadRecord (with a reason) for anything the pipeline must skip."""
    raw = as_dict(raw)
    turns = _turns(raw.get("conversations"))
    image, target = _image_ref(raw.get("image"), base_dir), _image_ref(raw.get("target_image"), base_dir)
    task = raw.get("task") or ("edit" if image and target else "t2i" if target else "i2t" if image else "text")
    if task not in TASKS:
        raise BadRecord("bad_task", f"task {task!r} not in {TASKS}")
    if task in ("t2i", "edit") and target is None:
        raise BadRecord("missing_image", f"a {task} record needs target_image")
    if task in ("i2t", "edit") and image is None:
        raise BadRecord("missing_image", f"a {task} record needs image")
    num_placeholders = sum(u.count(IMAGE) for u, _ in turns)
    if num_placeholders > 1:
        raise BadRecord("too_many_images", f"{num_placeholders} {IMAGE} placeholders; one image per record at most")
    if num_placeholders and image is None:
        raise BadRecord("missing_image", f"{IMAGE} in the text but no image")
    if image is not None and not num_placeholders:  # LLaVA's convention: the image leads the first user turn
        turns = ((f"{IMAGE}\n{turns[0][0]}", turns[0][1]),) + turns[1:]
    return Record(turns, task, image, target, raw.get("caption"), raw.get("meta"))


def load_image(ref: str | bytes) -> Image.Image:
    """A decoded PIL image from a path or the file's bytes; BadRecord if missing or corrupt."""
    try:
        image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
        image.load()  # decode now: a truncated file fails here, not later in a worker
    except FileNotFoundError:
        raise BadRecord("missing_image", str(ref)) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord("corrupt_image", f"{ref if isinstance(ref, str) else 'embedded image'}: {e}") from None
    return image
