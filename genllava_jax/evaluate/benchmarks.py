"""The benchmark table: a reader and a scorer per name, and `score` to dispatch.

Metrics are fractions in [0, 1], except MME's, which are its points (acc + acc+ ×100 per subtask, summed). With
`lenient=True` the multiple-choice benchmarks also report `lenient/<metric>`: the same metric under
`choice.lenient_choice`, which is not an official rule.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from genllava_jax.evaluate import choice, readers, scorers
from genllava_jax.evaluate.readers import Item


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _by(items: Sequence[Item], field: str) -> dict:
    out: dict = {}
    for i, it in enumerate(items):
        out.setdefault(it.meta.get(field), []).append(i)
    return out


def _accuracy_by(right: Sequence, items: Sequence[Item], field: str, name: str = "accuracy/{}") -> dict:
    return {name.format(kind): _mean(right[i] for i in idx) for kind, idx in _by(items, field).items()
            if kind is not None}


def _vqa_metrics(acc: list[float], items) -> dict:
    return {"accuracy": _mean(acc), **_accuracy_by(acc, items, "answer_type")}


def _vqav2(texts, items) -> dict:
    return _vqa_metrics([scorers.vqav2_accuracy(t, it.answers) for t, it in zip(texts, items)], items)


def _textvqa(texts, items) -> dict:
    return _vqa_metrics([scorers.vqa_accuracy(t, it.answers) for t, it in zip(texts, items)], items)


def _gqa(texts, items) -> dict:
    """Accuracy; `binary` / `open` as GQA's eval.py splits it (structural type 'query' is open) when the answers
    file carries the question types."""
    right = [scorers.gqa_match(t, it.answers[0]) for t, it in zip(texts, items)]
    return {"accuracy": _mean(right), **_accuracy_by(right, items, "answer_kind", "{}")}


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


def _lenient(texts, items) -> list[bool]:
    return [choice.lenient_choice(t, it.meta["choices"]) == it.answers[0] for t, it in zip(texts, items)]


def _scienceqa(texts, items, lenient: bool = False) -> dict:
    """eval_science_qa.py: `accuracy` over all questions, `img_accuracy` over those with an image (the
    ScienceQA-IMG number)."""
    def metrics(right):
        out = {"accuracy": _mean(right)}
        img = [r for r, it in zip(right, items) if it.meta.get("has_image")]
        if img:
            out["img_accuracy"] = _mean(img)
        return out

    out = metrics([choice.scienceqa_choice(t, len(it.meta["choices"])) == it.answers[0]
                   for t, it in zip(texts, items)])
    if lenient:
        out.update({f"lenient/{k}": v for k, v in metrics(_lenient(texts, items)).items()})
    return out


def _mmbench(texts, items, lenient: bool = False) -> dict:
    """VLMEvalKit's exact-matching MMBench: `circular_accuracy` (its reported number: a question counts when it and
    all its circular copies are read right), per `category/<name>` and `l2-category/<name>` of the question, and
    `accuracy` over every item (its vanilla-all check)."""
    def metrics(right):
        hits = dict(choice.mmbench_circular(right, [it.meta["group"] for it in items],
                                            [it.meta.get("main", True) for it in items]))
        if not hits:
            raise ValueError("mmbench: no main question (index < 1e6, round 0) to score CircularEval on")
        mains = [it for it in items if it.meta.get("main", True)]
        circ = [hits[it.meta["group"]] for it in mains]
        out = {"accuracy": _mean(right), "circular_accuracy": _mean(circ)}
        for field in ("l2-category", "category"):
            out.update(_accuracy_by(circ, mains, field, field + "/{}"))
        return out

    out = metrics([choice.mmbench_choice(t, it.meta["choices"]) == it.answers[0] for t, it in zip(texts, items)])
    if lenient:
        out.update({f"lenient/{k}": v for k, v in metrics(_lenient(texts, items)).items()})
    return out


def _seed(texts, items, lenient: bool = False) -> dict:
    """LLaVA's convert_seed_for_submission.py: right when the answer text is the letter; `accuracy`, by
    `<data_type>_accuracy` (image, video) and by `accuracy/<question type>`."""
    def metrics(right):
        return {"accuracy": _mean(right), **_accuracy_by(right, items, "data_type", "{}_accuracy"),
                **_accuracy_by(right, items, "question_type")}

    out = metrics([choice.seed_right(t, it.answers[0]) for t, it in zip(texts, items)])
    if lenient:
        out.update({f"lenient/{k}": v for k, v in metrics(_lenient(texts, items)).items()})
    return out


READERS: dict[str, Callable[..., list[Item]]] = {
    "vqav2": readers.read_vqav2, "gqa": readers.read_gqa, "textvqa": readers.read_textvqa,
    "pope": readers.read_pope, "mme": readers.read_mme, "scienceqa": readers.read_scienceqa,
    "mmbench": readers.read_mmbench, "seed": readers.read_seed,
}
SCORERS: dict[str, Callable[[list[str], Sequence[Item]], dict]] = {
    "vqav2": _vqav2, "textvqa": _textvqa, "gqa": _gqa, "pope": _pope, "mme": _mme, "scienceqa": _scienceqa,
    "mmbench": _mmbench, "seed": _seed,
}


def _check_name(benchmark: str) -> None:
    if benchmark not in SCORERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(SCORERS)}")


def read_benchmark(benchmark: str, *args, **kwargs) -> list[Item]:
    """`READERS[benchmark](*args, **kwargs)`."""
    _check_name(benchmark)
    return READERS[benchmark](*args, **kwargs)


LENIENT = ("scienceqa", "mmbench", "seed")  # the benchmarks that have a lenient variant


def score(benchmark: str, predictions: Sequence[str] | Mapping[str, str], items: Sequence[Item],
          lenient: bool = False) -> dict[str, float]:
    """Official metrics of `benchmark` for predictions given as a list aligned with `items` or a dict by item key
    (`readers.align_answers` turns a LLaVA answer file into the list); `lenient` adds `lenient/<metric>` for the
    multiple-choice benchmarks (LENIENT), computed with a rule that is not official."""
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
    if lenient and benchmark in LENIENT:
        return SCORERS[benchmark](texts, items, lenient=True)
    return SCORERS[benchmark](texts, items)
