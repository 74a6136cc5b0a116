"""GVIT records: LLaVA's JSON conversations plus `task`, `image`, `target_image` and an optional `caption`.

    {"id": "...", "task": "edit", "image": "images/a.png", "target_image": "images/b.png", "caption": "...",
     "conversations": [{"from": "human", "value": "<image>\\nMake it green."}, {"from": "gpt", "value": ""}]}

A data file is a JSON list of such records or JSONL (one a line, UTF-8, split at "\n" only: a U+2028 or U+0085 inside
a string is no line break; CRLF and a BOM are fine; a line that does not decode or parse is one skip). Image paths
are relative to the file's folder and must stay inside the data root (that folder unless given): `../..`, absolute
paths and symlinks leading out are refused. Roles: human/user, gpt/assistant, and an optional leading system turn
(prefixed to the first user turn, as Mistral has no system role). A missing `task` is inferred from the images
present.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import logging
from PIL import Image

from genllava_jax import errors
from genllava_jax.data.image import to_rgb
from genllava_jax.data.tokenizer import IMAGE

TASKS = ("text", "i2t", "t2i", "edit")  # index = the `task` id in batches
USER, ASSISTANT = ("human", "user"), ("gpt", "assistant")
# Why a record is skipped: the keys it is counted under (a fixed list, so hosts can sum their counts).
# "encode_error": anything else a record raised (named in the log: a case the checks above should catch).
REASONS = ("malformed", "not_utf8", "no_assistant", "bad_turns", "bad_task", "too_many_images", "special_token_in_text",
           "missing_image", "path_escape", "corrupt_image", "bad_image_mode", "image_too_large", "too_long",
           "encode_error")


class BadRecord(ValueError):
    """A record the pipeline skips; `reason` (one of REASONS) is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"BadRecord reason {reason!r} is not one of {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Record:
    turns: tuple[tuple[str, str], ...]  # (user, assistant) pairs
    task: str
    image: str | bytes | None = None  # an absolute path or the encoded file
    target_image: str | bytes | None = None
    caption: str | None = None
    meta: Any = None


class Lines:
    """A JSONL file's non-blank lines as bytes (decoded and parsed later, so a bad line is one skip); item i is
    (its line number, the line)."""

    def __init__(self, path: str | Path):
        lines = Path(path).read_bytes().removeprefix(BOM).split(b"\n")
        self.numbers = np.array([n for n, line in enumerate(lines, 1) if line.strip()], np.int64)
        self.lines = [lines[n - 1].removesuffix(b"\r") for n in self.numbers]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        return int(self.numbers[i]), self.lines[i]


BOM = "\ufeff".encode()


def read_records(path: str | Path) -> Sequence[tuple[int, Any]]:
    """(position, raw record) pairs of a data file: (line number, the line's bytes) for .jsonl (`Lines`), (index,
    the record) for a .json list. Positions name a record in messages (`where`)."""
    path = Path(path)
    if not path.is_file():
        raise errors.MissingFile(f"data file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        return Lines(path)
    try:
        records = json.loads(path.read_bytes().removeprefix(BOM).decode())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep, a 5000-digit number
        raise errors.BadValue(f"{path}: not a JSON list of records ({type(e).__name__}: {str(e)[:200]}); fix it, "
                              f"or write it as JSONL (one record a line), where a bad record is skipped alone") \
            from None
    if not isinstance(records, list):
        raise errors.BadValue(f"{path}: a .json data file holds a list of records, got {type(records).__name__}")
    return list(enumerate(records))


LOG_FIRST = 3  # skips logged per reason and process; the rest are only counted
_logged: collections.Counter = collections.Counter()
_log_lock = threading.Lock()


def log_skip(place: str, reason: str, detail: str) -> None:
    """One log line for each of the first LOG_FIRST skips of a reason in this process."""
    with _log_lock:
        _logged[reason] += 1
        n = _logged[reason]
    if n <= LOG_FIRST:
        more = f" (later {reason!r} skips are only counted)" if n == LOG_FIRST else ""
        logging.warning("data: skipped %s: %s: %s%s", place, reason, detail[:300], more)


def where(path: str | Path, position: int) -> str:
    """How a message names a record: `data.jsonl line 17` (1-based, as editors count), else `data.json record 3`."""
    return f"{path} {'line' if str(path).endswith('.jsonl') else 'record'} {position}"


def _image_ref(value, base_dir: Path | None, root: Path | None):
    """The image's path (resolved, checked to lie inside `root`) or its bytes."""
    if value is None or isinstance(value, bytes):
        return value
    if not isinstance(value, str) or not value or "\0" in value:
        raise BadRecord("malformed", f"image must be a non-empty path or bytes, got {value!r:.80}")
    if base_dir is None:
        return value
    try:
        path = (base_dir / value).resolve()  # follows symlinks: one pointing out of the root is caught below
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        raise BadRecord("malformed", f"image path {value!r:.80}: {e}") from None
    if root is not None and not path.is_relative_to(root):
        raise BadRecord("path_escape", f"image {value!r:.80} resolves to {path}, outside the data root {root}")
    return str(path)


def _turns(conversations) -> tuple[tuple[str, str], ...]:
    if not isinstance(conversations, list) or not all(isinstance(c, dict) for c in conversations):
        raise BadRecord("malformed", "conversations must be a list of {from, value}")
    msgs = [(c.get("from"), c.get("value")) for c in conversations]
    if any(not isinstance(v, str) for _, v in msgs):
        raise BadRecord("malformed", "every turn needs a string value")
    try:
        [v.encode() for _, v in msgs]  # lone surrogates (valid JSON escapes) are no text a tokenizer takes
    except UnicodeEncodeError as e:
        raise BadRecord("malformed", f"a turn is not valid unicode text: {e}") from None
    if msgs and msgs[0][0] == "system" and len(msgs) > 1:
        msgs = [(msgs[1][0], f"{msgs[0][1]}\n\n{msgs[1][1]}")] + msgs[2:]
    if not any(role in ASSISTANT for role, _ in msgs):
        raise BadRecord("no_assistant")
    users, answers = msgs[0::2], msgs[1::2]
    alternate = all(r in USER for r, _ in users) and all(r in ASSISTANT for r, _ in answers)
    if len(users) != len(answers) or not alternate:
        raise BadRecord("bad_turns", f"roles must alternate user/assistant, got {[r for r, _ in msgs]}")
    if any(IMAGE in a for _, a in answers):
        raise BadRecord("special_token_in_text", f"{IMAGE} in an assistant turn")
    return tuple((u, a) for (_, u), (_, a) in zip(users, answers))


def as_dict(raw: bytes | str | dict) -> dict:
    """A raw record (a dict, or a JSON line as bytes or text) as a dict."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode().removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise BadRecord("not_utf8", f"{e.reason} at byte {e.start}: {raw[max(0, e.start - 20):e.start + 20]!r}") \
                from None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON, nesting too deep, an integer over 4300 digits
            raise BadRecord("malformed", f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(raw, dict):
        raise BadRecord("malformed", f"a record is a JSON object, got {type(raw).__name__}")
    return raw


def parse(raw: bytes | str | dict, base_dir: Path | None = None, root: Path | None = None) -> Record:
    """A Record from a dict or a JSON line; raises BadRecord (with a reason) for anything the pipeline must skip.

    Image paths are taken relative to `base_dir` and must resolve inside `root` (default: `base_dir`).
    """
    raw = as_dict(raw)
    turns = _turns(raw.get("conversations"))
    root = None if base_dir is None else Path(root or base_dir).resolve()
    image, target = (_image_ref(raw.get(k), base_dir, root) for k in ("image", "target_image"))
    task = raw.get("task") or ("edit" if image and target else "t2i" if target else "i2t" if image else "text")
    if not isinstance(task, str) or task not in TASKS:
        raise BadRecord("bad_task", f"task {task!r:.40} not in {TASKS}")
    for key, ref, used in (("image", image, ("i2t", "edit")), ("target_image", target, ("t2i", "edit"))):
        if task in used and ref is None:
            raise BadRecord("missing_image", f"a {task} record needs {key}")
        if task not in used and ref is not None:  # e.g. a target the text task would load but never generate
            raise BadRecord("bad_task", f"a {task} record has {key}; only {' and '.join(used)} records use it")
    num_placeholders = sum(u.count(IMAGE) for u, _ in turns)
    if num_placeholders > 1:
        raise BadRecord("too_many_images", f"{num_placeholders} {IMAGE} placeholders; one image per record at most")
    if num_placeholders and image is None:
        raise BadRecord("missing_image", f"{IMAGE} in the text but no image")
    if image is not None and not num_placeholders:  # LLaVA's convention: the image leads the first user turn
        turns = ((f"{IMAGE}\n{turns[0][0]}", turns[0][1]),) + turns[1:]
    caption = raw.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise BadRecord("malformed", f"caption must be a string, got {type(caption).__name__}")
    try:
        (caption or "").encode()
    except UnicodeEncodeError as e:
        raise BadRecord("malformed", f"the caption is not valid unicode text: {e}") from None
    return Record(turns, task, image, target, caption, raw.get("meta"))


def load_image(ref: str | bytes, max_pixels: int | None = None) -> Image.Image:
    """A decoded RGB PIL image from a path or the file's bytes; BadRecord if missing, corrupt, too large (more than
    `max_pixels`, checked from the header before decoding) or in a mode with no RGB conversion."""
    name = ref if isinstance(ref, str) else "embedded image"
    try:
        if isinstance(ref, str) and Path(ref).exists() and not Path(ref).is_file():
            raise BadRecord("corrupt_image", f"{ref}: not a regular file")  # a folder, or a FIFO that would block
        image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
        if max_pixels and image.width * image.height > max_pixels:
            raise BadRecord("image_too_large", f"{name}: {image.width}x{image.height} pixels, more than "
                                               f"data.max_image_pixels={max_pixels}")
        image.load()  # decode now: a truncated file fails here, not later in a worker
    except BadRecord:
        raise
    except FileNotFoundError:
        raise BadRecord("missing_image", str(ref)) from None
    except Image.DecompressionBombError as e:  # PIL's own ceiling (Image.MAX_IMAGE_PIXELS)
        raise BadRecord("image_too_large", f"{name}: {e}") from None
    except Exception as e:  # decoders of arbitrary bytes raise OSError, SyntaxError, struct.error, ...
        raise BadRecord("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    try:
        return to_rgb(image)
    except Exception as e:  # e.g. float or exotic modes PIL cannot take to RGB
        raise BadRecord("bad_image_mode", f"{name}: mode {image.mode}: {e}") from None
