"""Official benchmark scorers as plain functions on prediction strings.

Each follows the script whose numbers papers report, including its quirks (noted where they matter):
- VQAv2 / TextVQA: the VQA evaluation's answer normalisation (GT-Vision-Lab `vqaEval.py`, as packaged by EvalAI and
  M4C, which LLaVA applies to its predictions) and the leave-one-out soft accuracy over the human answers;
- GQA: LLaVA's `convert_gqa_for_eval.py` normalisation, then the GQA `eval.py` exact match;
- POPE: LLaVA's `eval_pope.py` yes/no parsing and confusion-matrix metrics;
- MME: the MME `calculation.py` parsing and acc + acc+ per subtask (×100, summed);
- multiple choice (ScienceQA, MMBench, SEED-Bench): LLaVA's `eval_science_qa.py` letter rules, then VLMEvalKit's
  rule-based option and option-text matching (MMBench's first stage, before any GPT judge).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

# --- VQA answer normalisation ---------------------------------------------------------------------------------------

# The official table: keys are spellings without (some) apostrophes, values the canonical contraction. Quirks such as
# "somebody'd" -> "somebodyd" are kept because scores depend on them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# Meant as "a period not after a digit and not before one", but `(?!<=\d)` is a lookahead for the text "<=digit",
# so in effect every period not followed by a digit goes ("5." -> "5", "2.5" stays). Kept as the official regex.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def process_punctuation(text: str) -> str:
    """The VQA punctuation rule: a mark touching a space (or any mark, once the text has a comma inside a number,
    e.g. "1,000") is deleted; any other mark becomes a space ("red-white" -> "red white"); then periods go."""
    out = text
    drop_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        # The official code tests the *input* text for every mark, not the partly processed one.
        out = out.replace(p, "" if drop_all or (p + " " in text or " " + p in text) else " ")
    # The official call passes re.UNICODE (=32) where `sub` takes `count`: at most 32 periods are removed.
    return _PERIOD.sub("", out, 32)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, then restore apostrophes of known contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor (M4C/MMF `EvalAIAnswerProcessor`), which LLaVA applies to VQAv2 predictions before
    submission and to both sides for TextVQA: lower-case, drop commas and '?', split "'s", then the VQA rules."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: the mean, over leaving out each human answer in turn, of min(#others matching / 3, 1).

    With ten answers, 1/2/3/4+ matches give 0.3/0.6/0.9/1.0. Both sides are normalised with `normalize_answer` (the
    TextVQA evaluator does so; VQAv2's released answers are already in that form, so it changes nothing there).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    n = len(answers)
    # Leaving out a matching answer leaves matches-1 others; leaving out any other leaves all matches.
    return (matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)) / n


# --- GQA ----------------------------------------------------------------------------------------------------------


def gqa_match(prediction: str, answer: str) -> bool:
    """LLaVA strips surrounding space and trailing periods and lower-cases; GQA's eval.py then compares exactly."""
    return prediction.strip().rstrip(".").lower() == answer


# --- POPE ---------------------------------------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """'yes' or 'no' as LLaVA's eval_pope.py reads it: the first sentence, commas dropped, split on spaces; the
    words 'No', 'not' or 'no' make it 'no', anything else is 'yes' (so "NO" and "Nope" count as yes)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and the share of 'yes' answers; 'yes' is the positive class and any label
    other than 'no' counts as 'yes', as in eval_pope.py. Precision/recall/F1 with an empty denominator are 0 (the
    official script divides by zero there)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_metrics needs at least one prediction")
    pred = [pope_parse(p) == "yes" for p in predictions]
    gold = [lab != "no" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / len(pred), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# --- MME ----------------------------------------------------------------------------------------------------------

MME_SUBTASKS = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def mme_parse(text: str) -> str:
    """'yes', 'no' or 'other' as MME's calculation.py reads it: lower-cased, exact, else within its first 4 chars."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_scores(records: Iterable[Mapping]) -> dict[str, float]:
    """MME scores from records with keys category, image, answer ('yes'/'no') and prediction (free text).

    Per subtask: acc (questions right, 'other' counting wrong) + acc+ (images with both their questions right),
    each ×100, so at most 200; 'perception' and 'cognition' sum the subtasks present. `<task>/acc` and
    `<task>/acc_plus` are returned too. Every image must have exactly two questions, as calculation.py asserts.
    """
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    known = {t: kind for kind, tasks in MME_SUBTASKS.items() for t in tasks}
    for r in records:
        task, gold = r["category"], r["answer"].lower()
        if task not in known:
            raise ValueError(f"unknown MME subtask {task!r} (image {r['image']!r}); known: {sorted(known)}")
        if gold not in ("yes", "no"):
            raise ValueError(f"MME answer must be yes or no, got {r['answer']!r} (image {r['image']!r})")
        by_image[task][r["image"]].append(mme_parse(r["prediction"]) == gold)
    out: dict[str, float] = {"perception": 0.0, "cognition": 0.0}
    for task, images in by_image.items():
        for image, right in images.items():
            if len(right) != 2:
                raise ValueError(f"MME image {image!r} ({task}) has {len(right)} questions; every image has 2")
        acc = sum(sum(r) for r in images.values()) / (2 * len(images))
        acc_plus = sum(all(r) for r in images.values()) / len(images)
        out[f"{task}/acc"], out[f"{task}/acc_plus"] = acc, acc_plus
        out[task] = 100 * acc + 100 * acc_plus
        out[known[task]] += out[task]
    return out


# --- multiple choice ----------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def extract_choice(text: str, choices: Sequence[str], strict: bool = False) -> str | None:
    """The option letter a free-text answer picks among len(choices) options, or None.

    LLaVA's eval_science_qa.py rules first: the bare letter, "X. ...", "The answer is X". Unless `strict`, then
    VLMEvalKit's: exactly one option letter standing alone once brackets and punctuation are spaced out ("(B)",
    "B.", "Answer: B"; a lone "A" in a longer answer is taken for the article, so it is ambiguous), else exactly one
    option text contained in the answer (case-insensitive), also when letters were ambiguous.
    """
    letters = tuple(LETTERS[: len(choices)])
    s = text.replace("\n", ". ").strip()
    if s in letters:
        return s
    if len(s) >= 3 and s[0] in letters and s[1:3] == ". ":
        return s[0]
    m = re.search(r"The answer is ([A-J])", s)
    if m and m.group(1) in letters:
        return m.group(1)
    if strict:
        return None
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", s).split()
    hits = [c for c in letters if c in words]
    if len(hits) == 1 and not ("A" in words and len(words) > 3):
        return hits[0]
    low = s.lower()  # no single letter: VLMEvalKit falls back to the option texts
    texts = [c for c, opt in zip(letters, choices) if str(opt).strip() and str(opt).lower() in low]
    return texts[0] if len(texts) == 1 else None


def multiple_choice_accuracy(predictions: Sequence[str], answers: Sequence[str], choices: Sequence[Sequence[str]],
                             strict: bool = False) -> float:
    """Share of predictions whose extracted letter (`extract_choice`) equals the answer letter."""
    if not (len(predictions) == len(answers) == len(choices)):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(answers)} answers, "
                         f"{len(choices)} choice lists")
    if not answers:
        raise ValueError("multiple_choice_accuracy needs at least one prediction")
    right = [extract_choice(p, c, strict) == a for p, a, c in zip(predictions, answers, choices)]
    return sum(right) / len(right)


def circular_accuracy(correct: Sequence[bool], groups: Sequence) -> float:
    """MMBench CircularEval: a question counts only if every rotation of its options (same group) is right."""
    if len(correct) != len(groups):
        raise ValueError(f"{len(correct)} results but {len(groups)} group ids")
    ok: dict = {}
    for c, g in zip(correct, groups):
        ok[g] = ok.get(g, True) and bool(c)
    if not ok:
        raise ValueError("circular_accuracy needs at least one result")
    return sum(ok.values()) / len(ok)
