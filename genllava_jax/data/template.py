"""The Mistral-Instruct template, `<s>[INST] {user} [/INST] {assistant}</s>` per turn, with labels on answers only.

Labels are aligned with `input_ids` (HF convention: the loss shifts them): `labels[t] == input_ids[t]` on the
assistant's tokens and their closing `</s>`, IGNORE elsewhere. Each text piece is stripped and encoded on its own
(`add_special_tokens=False`) and the special ids are spliced in between, so the result never depends on how a
tokenizer treats whitespace around special tokens.
"""

from __future__ import annotations

import functools

from genllava_jax.constants import IGNORE
from genllava_jax.data.tokenizer import END_INST, IMAGE, INST, SpecialIds

TASK_TOKEN = {"i2t": "i2t", "t2i": "t2i", "edit": "t2i"}  # task -> SpecialIds field starting the first user turn
GENERATES = ("t2i", "edit")  # tasks whose last answer ends with [SOI] [IMG0..N-1] [EOI]


def encode_text(tokenizer, text: str) -> list[int]:
    return list(_encode(tokenizer, text.strip()))


@functools.lru_cache(maxsize=1 << 16)  # templates, questions and short answers recur: tokenize each once
def _encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()


def encode_user(tokenizer, ids: SpecialIds, text: str, num_patches: int) -> list[int]:
    """A user turn; each `<image>` becomes `num_patches` image ids, where the model splices the projected patches."""
    first, *rest = text.split(IMAGE)
    out = encode_text(tokenizer, first)
    for piece in rest:
        out += [ids.image] * num_patches + encode_text(tokenizer, piece)
    return out


def encode_conversation(tokenizer, ids: SpecialIds, turns: list[tuple[str, str]], *, task: str,
                        num_patches: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of (user, assistant) turns for a task in text, i2t, t2i, edit."""
    input_ids, labels = [ids.bos], [IGNORE]
    for i, (user, assistant) in enumerate(turns):
        prompt = _user_turn(tokenizer, ids, user, task if i == 0 else None, num_patches)
        generation = list(ids.generation) if i == len(turns) - 1 and task in GENERATES else []
        answer = encode_text(tokenizer, assistant) + generation + [ids.eos]
        input_ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    return input_ids, labels


def _user_turn(tokenizer, ids: SpecialIds, user: str, task: str | None, num_patches: int) -> list[int]:
    task_ids = [getattr(ids, TASK_TOKEN[task])] if task in TASK_TOKEN else []
    return (encode_text(tokenizer, INST) + task_ids + encode_user(tokenizer, ids, user, num_patches)
            + encode_text(tokenizer, END_INST))


def encode_prompt(tokenizer, ids: SpecialIds, history: list[tuple[str, str]], user: str, *, task: str,
                  num_patches: int) -> list[int]:
    """input_ids of the finished turns in `history` plus a new user turn: what the assistant answers next."""
    input_ids = (encode_conversation(tokenizer, ids, history, task=task, num_patches=num_patches)[0] if history
                 else [ids.bos])
    return input_ids + _user_turn(tokenizer, ids, user, None if history else task, num_patches)
