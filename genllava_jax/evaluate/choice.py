"""Multiple-choice answer rules, each equal to the code that scores the benchmark officially.

- ScienceQA: LLaVA's `llava/eval/eval_science_qa.py` (haotian-liu/LLaVA c121f04);
- SEED-Bench: LLaVA's `scripts/convert_seed_for_submission.py`: the answer text must be the letter itself;
- MMBench: VLMEvalKit's rule-based matching (`vlmeval/utils/matching_util.py` `can_infer`, open-compass/VLMEvalKit
  e8e78f05, with its default `VERBOSE` unset) and CircularEval grouping (`vlmeval/dataset/utils/multiple_choice.py`
  `mcq_circular_eval` under the `exact_matching` judge): no GPT judge, so an answer the rules cannot read is wrong.
- `lenient_choice` is ours, not official: LLaVA's letter rules, then VLMEvalKit's. Scores computed with it are
  reported under `lenient/...` names and only when asked for.
"""

from __future__ import annotations

import re
from typing import Sequence

LETTERS = "ABCDEFGHIJ"
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options default (a list: "AB" is not in it)
_SCIENCEQA_ANSWER = re.compile(r"The answer is ([A-Z]).")  # '.' is any character but a newline, as theirs


def scienceqa_choice(text: str, n_choices: int) -> str | None:
    """The letter eval_science_qa.py reads from an answer, or None ("FAILED", or a letter past the choices).

    The whole text must be a letter, or start with "X. ", or hold exactly one "The answer is X" followed by a
    character other than a newline: "B\\na song" is no answer, "A\\nThe answer is B." is B.
    """
    if text in SCIENCEQA_OPTIONS:
        answer = text
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        answer = text[0]
    else:
        found = _SCIENCEQA_ANSWER.findall(text)
        answer = found[0] if len(found) == 1 else None
    return answer if answer in SCIENCEQA_OPTIONS[:n_choices] else None


def seed_right(text: str, answer: str) -> bool:
    """SEED-Bench as LLaVA scores it: the (stripped) answer text equals the answer letter."""
    return text == answer


# --- MMBench: VLMEvalKit's can_infer ----------------------------------------------------------------------------

_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _infer_option(text: str, letters: Sequence[str]) -> str | None:
    """can_infer_option: 'Z' for a refusal; one option letter standing alone among the last four words once
    '.()[],:;!*#{}' are spaced out; a lone 'Z'; "(correct) answer is X" (case-insensitive, A-D only)."""
    if "Failed to obtain answer via API" in text:
        return None
    if any(r in text for r in _REFUSALS):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    count = sum(c in words for c in letters)
    if count == 1:
        for c in letters:  # (the article check on a lone "A" runs only with VERBOSE set)
            if c in words and words.index(c) > len(words) - 5:
                return c
    elif count == 0 and "Z" in words:
        return "Z"
    m = _VERBOSE_ANSWER.search(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


def _infer_text(text: str, letters: Sequence[str], choices: Sequence[str]) -> str | None:
    """can_infer_text: exactly one option text inside the lower-cased answer, which may be at most twice as long
    as all option texts together."""
    low = text.lower()
    if len(low) > 2 * sum(len(str(c)) for c in choices):
        return None
    hits = [k for k, c in zip(letters, choices) if str(c).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_choice(text: str, choices: Sequence[str]) -> str | None:
    """VLMEvalKit's `can_infer(text, {A: choices[0], ...})`: an option letter, 'Z' (a refusal: always wrong), or
    None (nothing read; wrong under exact matching)."""
    letters = LETTERS[: len(choices)]
    return _infer_option(text, letters) or _infer_text(text, letters, choices)


def mmbench_circular(right: Sequence[bool], groups: Sequence[int], mains: Sequence[bool]) -> list[tuple[int, bool]]:
    """CircularEval: (group, hit) for each main item (VLMEvalKit: index == index % 1e6), hit when every item of
    its group (the main one and its circular copies) is right. Groups with no main item are not counted."""
    if not (len(right) == len(groups) == len(mains)):
        raise ValueError(f"lengths differ: {len(right)} results, {len(groups)} groups, {len(mains)} main flags")
    ok: dict[int, bool] = {}
    for r, g in zip(right, groups):
        ok[g] = ok.get(g, True) and bool(r)
    return [(g, ok[g]) for g, m in zip(groups, mains) if m]


def lenient_choice(text: str, choices: Sequence[str]) -> str | None:
    """Not an official rule (opt-in, reported as `lenient/...`): LLaVA's letter rules on the text with newlines
    read as ". " and "The answer is X" anywhere, then VLMEvalKit's matching (a refusal reads as no answer)."""
    letters = tuple(LETTERS[: len(choices)])
    s = text.replace("\n", ". ").strip()
    if s in letters:
        return s
    if len(s) >= 3 and s[0] in letters and s[1:3] == ". ":
        return s[0]
    m = re.search(r"The answer is ([A-J])", s)
    if m and m.group(1) in letters:
        return m.group(1)
    got = mmbench_choice(text, choices)
    return None if got == "Z" else got
