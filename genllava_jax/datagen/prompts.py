"""Prompt files: what the LLM is asked, editable TOML under configs/datagen/ (the defaults are ours, not the papers').

    kind = "conversation"        # how the reply is read (datagen.replies): conversation, description, dialogue, text
    max_new_tokens = 1024        # the decode limit: a reply cut there is filtered as unfinished
    max_words = 600              # a longer record is filtered as too_long
    system = "..."               # the system message (at the head of the first user turn: Mistral has no system role)
    user = "{context}"           # the request's user turn; {name}s are the maker's fields (context, topic, ...)
    questions = ["..."]          # description: the record's question, one drawn per record (seeded by its id)

    [[examples]]                 # in-context examples: earlier turns, each `user` filled from the example's fields
    context = "..."
    reply = "..."

A "fields" file (stablellava's field-by-field mode) holds one such table per field, [image_prompt], [question] and
[answer], plus `turns` (question/answer pairs per dialogue) and `max_words` (the whole dialogue's). Literal braces
in a template are written {{ and }}.
"""

from __future__ import annotations

import dataclasses
import random
import string
import tomllib
from pathlib import Path

from genllava_jax import errors
from genllava_jax.datagen.llm import Request

KINDS = ("conversation", "description", "dialogue", "text")
FIELDS = ("image_prompt", "question", "answer")


@dataclasses.dataclass(frozen=True)
class Prompt:
    name: str  # where it came from, for messages
    kind: str
    user: str
    system: str = ""
    examples: tuple[dict, ...] = ()
    questions: tuple[str, ...] = ()
    max_new_tokens: int = 512
    max_words: int = 600

    def fields(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.user) if f}

    def request(self, key: str, **values) -> Request:
        turns = tuple((self.user.format(**ex), ex["reply"]) for ex in self.examples)
        return Request(key, turns, self.user.format(**values), self.max_new_tokens, self.system)

    def question(self, key: str) -> str:
        """description: the record's question, drawn by its id."""
        return random.Random(key).choice(self.questions)


@dataclasses.dataclass(frozen=True)
class FieldsPrompt:
    """stablellava's field-by-field mode: one request per field, the dialogue built turn by turn."""
    name: str
    image_prompt: Prompt
    question: Prompt
    answer: Prompt
    turns: int = 2
    max_words: int = 600  # the whole dialogue's


def _prompt(name: str, t: dict, kind: str | None = None) -> Prompt:
    known = {f.name for f in dataclasses.fields(Prompt)} - {"name"}
    if unknown := set(t) - known:
        raise errors.BadValue(f"{name}: unknown keys {sorted(unknown)}; a prompt has {sorted(known)}")
    if "user" not in t:
        raise errors.BadValue(f"{name}: no `user` template")
    kind = t.get("kind", kind or "text")
    if kind not in KINDS:
        raise errors.BadValue(f"{name}: kind={kind!r}; expected one of {KINDS}")
    p = Prompt(name, kind, t["user"], t.get("system", ""), tuple(t.get("examples", ())), tuple(t.get("questions", ())),
               int(t.get("max_new_tokens", 512)), int(t.get("max_words", 600)))
    if kind == "description" and not p.questions:
        raise errors.BadValue(f"{name}: a description prompt needs `questions` (the records' questions)")
    for n, ex in enumerate(p.examples):
        missing = (p.fields() | {"reply"}) - set(ex)
        if missing:
            raise errors.BadValue(f"{name}: examples[{n}] lacks {sorted(missing)}")
    return p


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise errors.MissingFile(f"{path}: no such prompt file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise errors.BadValue(f"{path}: not TOML: {e}") from None


def load(path, fields: set[str] | None = None) -> Prompt:
    """A prompt file; `fields`: the values the maker fills in (a template naming another is an error now)."""
    p = _prompt(str(path), _read(path))
    if fields is not None and (extra := p.fields() - fields):
        raise errors.BadValue(f"{path}: the user template names {sorted(extra)}; this maker fills {sorted(fields)}")
    return p


def load_fields(path) -> FieldsPrompt:
    t = _read(path)
    if missing := [f for f in FIELDS if not isinstance(t.get(f), dict)]:
        raise errors.BadValue(f"{path}: a fields prompt file needs the tables {list(FIELDS)}; missing {missing}")
    if unknown := set(t) - set(FIELDS) - {"turns", "kind", "max_words"}:
        raise errors.BadValue(f"{path}: unknown keys {sorted(unknown)}")
    parts = {f: _prompt(f"{path} [{f}]", t[f], "text") for f in FIELDS}
    allowed = {"image_prompt": {"topic"}, "question": {"topic", "image_prompt", "dialogue"},
               "answer": {"topic", "image_prompt", "dialogue", "question"}}
    for f, p in parts.items():
        if extra := p.fields() - allowed[f]:
            raise errors.BadValue(f"{path} [{f}]: the user template names {sorted(extra)}; it may use "
                                  f"{sorted(allowed[f])}")
    turns = int(t.get("turns", 2))
    if turns < 1:
        raise errors.BadValue(f"{path}: turns={turns}; at least 1")
    return FieldsPrompt(str(path), parts["image_prompt"], parts["question"], parts["answer"], turns,
                        int(t.get("max_words", 600)))


def default_dir() -> Path:
    """configs/datagen of the checkout, else of the installed package (genllava_jax.configs)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "configs" / "datagen").is_dir():  # not site-packages/configs
        return root / "configs" / "datagen"
    from genllava_jax import configs

    return Path(configs.__file__).parent / "datagen"
