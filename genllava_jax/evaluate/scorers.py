"""Official benchmark scorers as plain functions on prediction strings.

Each is the code whose numbers papers report, quirks included (noted where they matter):
- VQAv2: LLaVA's `convert_vqav2_for_submission.py` runs EvalAI's answer processor on the prediction, then the VQA
  evaluation code (GT-Vision-Lab/VQA `vqaEval.py`, a013f00) compares it with the human answers, normalising both
  again only when the humans disagree;
- TextVQA: LLaVA's `m4c_evaluator.py` (EvalAI's processor on both sides, leave-one-out soft accuracy);
- GQA: LLaVA's `convert_gqa_for_eval.py` (`rstrip('.').lower()`), then GQA's `eval.py` exact match;
- POPE: LLaVA's `eval_pope.py`; MME: LLaVA's `convert_answer_to_mme.py` + MME's `eval_tool/calculation.py`;
- multiple choice (ScienceQA, SEED-Bench, MMBench): `choice.py`.
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
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")  # vqaEval.py's; EvalAI's `(?<=\d)(,)+(?=\d)` never meets a comma
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


def _soft_accuracy(pred: str, answers: Sequence[str]) -> float:
    """The mean, over leaving out each human answer in turn, of min(#others equal to pred / 3, 1): with ten
    answers, 1/2/3/4+ matches give 0.3/0.6/0.9/1.0."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    matches = sum(a == pred for a in answers)
    n = len(answers)
    # Leaving out a matching answer leaves matches-1 others; leaving out any other leaves all matches.
    return (matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)) / n


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA (LLaVA's m4c_evaluator.py): EvalAI's `normalize_answer` on the prediction and every human answer,
    then the soft accuracy. (m4c asserts ten answers; any number is accepted here.)"""
    return _soft_accuracy(normalize_answer(prediction), [normalize_answer(a) for a in answers])


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2: LLaVA submits `normalize_answer(prediction)`; vqaEval.py (GT-Vision-Lab/VQA a013f00) replaces tabs
    and newlines and strips both sides, and only when the human answers disagree runs the punctuation and
    digit/article rules on both again; when they all agree it compares the submitted answer with them as released.
    """
    def clean(text):
        return text.replace("\n", " ").replace("\t", " ").strip()

    pred, gts = clean(normalize_answer(prediction)), [clean(a) for a in answers]
    if len(set(gts)) > 1:
        pred = process_digit_article(process_punctuation(pred))
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
    return _soft_accuracy(pred, gts)


# --- GQA ----------------------------------------------------------------------------------------------------------


def gqa_match(prediction: str, answer: str) -> bool:
    """LLaVA drops trailing periods and lower-cases (no whitespace strip: its answers are already stripped);
    GQA's eval.py then compares exactly."""
    return prediction.rstrip(".").lower() == answer


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
    """MME scores from records (in answer-file order) with keys category, image, answer ('yes'/'no') and
    prediction, as LLaVA's convert_answer_to_mme.py writes them into one `image<TAB>question<TAB>answer<TAB>
    prediction` line each per subtask and calculation.py reads those lines back, two consecutive ones an image.

    Per subtask: acc (questions right, 'other' counting wrong) + acc+ (images with both their questions right),
    each ×100, so at most 200; 'perception' and 'cognition' sum the subtasks present. `<task>/acc` and
    `<task>/acc_plus` are returned too. Where calculation.py stops (a prediction with a tab or line break breaks
    its line format; an image whose two questions are not next to each other it would pair wrongly) this raises.
    """
    known = {t: kind for kind, tasks in MME_SUBTASKS.items() for t in tasks}
    tasks: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for r in records:
        task, image, gold = r["category"], r["image"], r["answer"].lower()
        if task not in known:
            raise ValueError(f"unknown MME subtask {task!r} (image {image!r}); known: {sorted(known)}")
        if gold not in ("yes", "no"):
            raise ValueError(f"MME answer must be yes or no, got {r['answer']!r} (image {image!r})")
        if any(c in r["prediction"] for c in "\t\r\n"):
            raise ValueError(f"MME image {image!r}: prediction {r['prediction']!r} has a tab or line break, which "
                             f"calculation.py cannot read (one tab-separated line per question)")
        # calculation.py parses `prediction + "\n"`: the same label as the bare prediction
        tasks[task].append((image, mme_parse(r["prediction"]) == gold))
    out: dict[str, float] = {"perception": 0.0, "cognition": 0.0}
    for task, rows in tasks.items():
        pairs = [rows[i:i + 2] for i in range(0, len(rows), 2)]
        for pair in pairs:
            if len(pair) != 2 or pair[0][0] != pair[1][0]:
                raise ValueError(f"MME {task}: image {pair[0][0]!r} does not have its two questions next to each "
                                 f"other (calculation.py pairs consecutive lines)")
        acc = sum(right for _, right in rows) / len(rows)
        acc_plus = sum(a[1] and b[1] for a, b in pairs) / len(pairs)
        out[f"{task}/acc"], out[f"{task}/acc_plus"] = acc, acc_plus
        out[task] = 100 * acc + 100 * acc_plus
        out[known[task]] += out[task]
    return out
