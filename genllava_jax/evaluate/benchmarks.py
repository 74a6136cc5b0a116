"""The benchmark table: a reader and a scorer per name, and `score` to dispatch.

Metrics are fractions in [0, 1], except MME's, which are its points (acc + acc+ ×100 per subtask, summed).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from genllava_jax.evaluate import readers, scorers
from genllava_jax.evaluate.readers import Item


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _by(items: Sequence[Item], field: str) -> dict:
    out: dict = {}
    for i, it in enumerate(items):
        out.setdefault(it.meta.get(field), []).append(i)
    return out


def _vqa(texts, items) -> dict:
    acc = [scorers.vqa_accuracy(t, it.answers) for t, it in zip(texts, items)]
    out = {"accuracy": _mean(acc)}
    for kind, idx in _by(items, "answer_type").items():
        if kind is not None:
            out[f"accuracy/{kind}"] = _mean(acc[i] for i in idx)
    return out


def _gqa(texts, items) -> dict:
    return {"accuracy": _mean(scorers.gqa_match(t, it.answers[0]) for t, it in zip(texts, items))}


def _pope(texts, items) -> dict:
    """Metrics per category (`<category>/<metric>`) and their mean over categories (LLaVA reports each category;
    papers quote the mean F1)."""
    per = {}
    for cat, idx in _by(items, "category").items():
        per[cat] = scorers.pope_metrics([texts[i] for i in idx], [items[i].answers[0] for i in idx])
    out = {}
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        out[name] = _mean(m[name] for m in per.values())
        out.update({f"{cat}/{name}": m[name] for cat, m in per.items()})
    return out


def _mme(texts, items) -> dict:
    return scorers.mme_scores(
        {"category": it.meta["category"], "image": it.meta["image_id"], "answer": it.answers[0], "prediction": t}
        for t, it in zip(texts, items))


def _choice_right(texts, items, strict: bool) -> list[bool]:
    return [scorers.extract_choice(t, it.meta["choices"], strict) == it.answers[0] for t, it in zip(texts, items)]


def _scienceqa(texts, items) -> dict:
    """LLaVA's strict letter rules; `img_accuracy` (questions with an image) is the ScienceQA-IMG number."""
    right = _choice_right(texts, items, strict=True)
    out = {"accuracy": _mean(right)}
    img = [r for r, it in zip(right, items) if it.meta.get("has_image")]
    if img:
        out["img_accuracy"] = _mean(img)
    return out


def _mmbench(texts, items) -> dict:
    """Per-question `accuracy` and MMBench's `circular_accuracy` (all rotations of a question right)."""
    right = _choice_right(texts, items, strict=False)
    return {"accuracy": _mean(right),
            "circular_accuracy": scorers.circular_accuracy(right, [it.meta["group"] for it in items])}


def _seed(texts, items) -> dict:
    """LLaVA compares the answer text with the letter; the strict rules also accept "A. ..." and "The answer is A"."""
    right = _choice_right(texts, items, strict=True)
    out = {"accuracy": _mean(right)}
    for kind, idx in _by(items, "data_type").items():
        if kind is not None:
            out[f"{kind}_accuracy"] = _mean(right[i] for i in idx)
    for kind, idx in _by(items, "question_type").items():
        if kind is not None:
            out[f"accuracy/{kind}"] = _mean(right[i] for i in idx)
    return out


READERS: dict[str, Callable[..., list[Item]]] = {
    "vqav2": readers.read_vqav2, "gqa": readers.read_gqa, "textvqa": readers.read_textvqa,
    "pope": readers.read_pope, "mme": readers.read_mme, "scienceqa": readers.read_scienceqa,
    "mmbench": readers.read_mmbench, "seed": readers.read_seed,
}
SCORERS: dict[str, Callable[[list[str], Sequence[Item]], dict]] = {
    "vqav2": _vqa, "textvqa": _vqa, "gqa": _gqa, "pope": _pope, "mme": _mme, "scienceqa": _scienceqa,
    "mmbench": _mmbench, "seed": _seed,
}


def _check_name(benchmark: str) -> None:
    if benchmark not in SCORERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(SCORERS)}")


def read_benchmark(benchmark: str, *args, **kwargs) -> list[Item]:
    """`READERS[benchmark](*args, **kwargs)`."""
    _check_name(benchmark)
    return READERS[benchmark](*args, **kwargs)


def score(benchmark: str, predictions: Sequence[str] | Mapping[str, str], items: Sequence[Item]) -> dict[str, float]:
    """Official metrics of `benchmark` for predictions given as a list aligned with `items` or a dict by item key
    (`readers.align_answers` turns a LLaVA answer file into the list)."""
    _check_name(benchmark)
    if not items:
        raise ValueError(f"{benchmark}: no items to score")
    if isinstance(predictions, Mapping):
        missing = [it.key for it in items if it.key not in predictions]
        if missing:
            raise ValueError(f"{benchmark}: {len(missing)} items have no prediction, e.g. keys {missing[:5]}")
        texts = [predictions[it.key] for it in items]
    else:
        texts = list(predictions)
        if len(texts) != len(items):
            raise ValueError(f"{benchmark}: {len(texts)} predictions for {len(items)} items")
    for t, it in zip(texts, items):
        if not isinstance(t, str):
            raise ValueError(f"{benchmark}: prediction for {it.key} ({it.source}) is {type(t).__name__}, not str")
        if not it.answers:
            raise ValueError(f"{benchmark}: {it.source} has no reference answer; read the split with its "
                             f"answer/annotation file to score it")
    return SCORERS[benchmark](texts, items)
