"""Reading the LLM's replies and filtering them; every rejection has a reason (REASONS), counted in the report.

Reply formats (what the prompt files ask for):
    conversation   `Question:` / `Answer:` turns (also Q:/A:, User:/Assistant:, Human:/GPT:), a turn running on to
                   the next marker, so answers may span lines; text before the first marker is dropped
    dialogue       the same, after a first `Image:` (or `Image prompt:`, `Prompt:`) line: the image's prompt
    description    the whole reply is the answer (the question comes from the prompt file)
    text           one field (stablellava's field-by-field mode): a leading marker is dropped, lines joined

Filters, in order: unfinished (cut at the token limit), empty, the format's own (no_turns, malformed,
no_image_prompt), special_token (text that would forge the template's tokens), coordinates (numbers from the
context's boxes in what the assistant says: a reader who sees the image would not know them), repetitive (a word
four times in a row, more than 30 % repeated 4-grams, or a question asked twice), too_long (more words than the
prompt file's max_words).
"""

from __future__ import annotations

import re

REASONS = ("unfinished", "empty", "no_turns", "malformed", "no_image_prompt", "special_token", "coordinates",
           "repetitive", "too_long")

_MARK = r"^[\s*#>_-]*(?:\d+[.)]\s*)?(?:\*\*)?({})(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*"
_QUESTION, _ANSWER = ("question", "q", "user", "human"), ("answer", "a", "assistant", "gpt")
_IMAGE = ("image prompt", "image", "prompt")
_SPECIAL = re.compile(r"<image>|\[/?INST\]|</?s>|\[(?:I2T|T2I|SOI|EOI|IMG\d+)\]")
# a box or point as the context writes them ([0.312, 0.120, ...]), a coordinate pair, or a 3-decimal fraction
_COORDS = re.compile(r"\[\s*-?\d*\.\d+\s*,\s*-?\d*\.\d+|\(\s*-?\d*\.\d+\s*,\s*-?\d*\.\d+\s*\)|\b[01]\.\d{3}\b")


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _marker(names) -> re.Pattern:
    return re.compile(_MARK.format("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))), re.I)


_ROLE = _marker(_QUESTION + _ANSWER)
_ROLE_OR_IMAGE = _marker(_QUESTION + _ANSWER + _IMAGE)


def _segments(text: str, pattern: re.Pattern) -> list[tuple[str, str]]:
    """(role, text) for each marked segment: 'q', 'a' or 'image'; unmarked lines continue the current one."""
    out: list[list] = []
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            name = m.group(1).lower()
            role = "q" if name in _QUESTION else "a" if name in _ANSWER else "image"
            out.append([role, line[m.end():]])
        elif out:
            out[-1][1] += "\n" + line
    return [(r, t.strip()) for r, t in out]


def _turns(segments: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not segments:
        raise Rejected("no_turns", "no Question:/Answer: markers")
    roles = [r for r, _ in segments]
    if roles != ["q", "a"] * (len(roles) // 2) or len(roles) % 2:
        raise Rejected("malformed", f"turns must alternate question/answer, got {''.join(roles)}")
    return [(segments[i][1], segments[i + 1][1]) for i in range(0, len(segments), 2)]


def parse_conversation(text: str) -> list[tuple[str, str]]:
    """(question, answer) turns of a conversation reply."""
    return _turns(_segments(text, _ROLE))


def parse_dialogue(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(image prompt, turns) of a StableLLaVA-style reply."""
    segments = _segments(text, _ROLE_OR_IMAGE)
    if not segments or segments[0][0] != "image" or not segments[0][1]:
        raise Rejected("no_image_prompt", "the reply must start with an `Image:` line")
    if any(r == "image" for r, _ in segments[1:]):
        raise Rejected("malformed", "more than one image prompt")
    return " ".join(segments[0][1].split()), _turns(segments[1:])


def parse_field(text: str) -> str:
    """One field: a leading marker dropped, whitespace collapsed."""
    m = _ROLE_OR_IMAGE.match(text)
    return " ".join((text[m.end():] if m else text).split())


def repetitive(text: str) -> bool:
    words = re.findall(r"\w+", text.lower())
    if any(words[i] == words[i + 1] == words[i + 2] == words[i + 3] for i in range(len(words) - 3)):
        return True
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(grams) >= 12 and 1 - len(set(grams)) / len(grams) > 0.3


def check(turns: list[tuple[str, str]], *, max_words: int, extra: tuple[str, ...] = ()) -> None:
    """Raises Rejected if the parsed turns (and `extra` texts, e.g. the image prompt) fail a filter."""
    texts = [t for qa in turns for t in qa] + list(extra)
    if not turns or any(not t.strip() for t in texts):
        raise Rejected("empty", "an empty turn")
    if m := next((_SPECIAL.search(t) for t in texts if _SPECIAL.search(t)), None):
        raise Rejected("special_token", repr(m.group(0)))
    if m := next((_COORDS.search(t) for qa in turns for t in qa if _COORDS.search(t)), None):
        raise Rejected("coordinates", repr(m.group(0)))
    questions = [" ".join(q.lower().split()) for q, _ in turns]
    if len(set(questions)) < len(questions) or any(repetitive(t) for t in texts):
        raise Rejected("repetitive")
    words = sum(len(t.split()) for t in texts)
    if words > max_words:
        raise Rejected("too_long", f"{words} words > {max_words}")


def read(kind: str, text: str, finished: bool, max_words: int, question: str = ""):
    """The reply of a prompt of `kind` as turns ((image prompt, turns) for dialogue), or Rejected. `question`:
    a description's question (its answer is the reply)."""
    if not finished:
        raise Rejected("unfinished", "cut at max_new_tokens")
    if not text.strip():
        raise Rejected("empty", "an empty reply")
    if kind == "conversation":
        turns = parse_conversation(text)
        check(turns, max_words=max_words)
        return turns
    if kind == "dialogue":
        image, turns = parse_dialogue(text)
        check(turns, max_words=max_words, extra=(image,))
        return image, turns
    if kind == "description":
        turns = [(question, text.strip())]
        check(turns, max_words=max_words)
        return turns
    field = parse_field(text)
    if not field:
        raise Rejected("empty", "an empty field")
    if m := _SPECIAL.search(field):
        raise Rejected("special_token", repr(m.group(0)))
    if repetitive(field):
        raise Rejected("repetitive")
    return field
