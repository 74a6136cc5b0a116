"""Benchmarks: readers for LLaVA's evaluation files, their official scorers, and image-generation metrics.

Scorers, plain functions on strings, each equal to the official code (`scorers.py`, `choice.py`):
    normalize_answer(text) -> str                      EvalAI/VQA answer normalisation
    vqav2_accuracy(prediction, answers) -> float       VQAv2 (LLaVA's submission + the VQA server's vqaEval.py)
    vqa_accuracy(prediction, answers) -> float         TextVQA (LLaVA's m4c_evaluator.py)
    gqa_match(prediction, answer) -> bool
    pope_metrics(predictions, labels) -> dict          accuracy, precision, recall, f1, yes_ratio, tp/fp/tn/fn
    mme_scores(records) -> dict                        records: {category, image, answer, prediction};
                                                       '<subtask>', '<subtask>/acc', '/acc_plus', perception, cognition
    scienceqa_choice(text, n_choices) -> letter | None LLaVA's eval_science_qa.py
    seed_right(text, answer) -> bool                   LLaVA's SEED-Bench rule (the letter itself)
    mmbench_choice(text, choices) -> letter | 'Z' | None   VLMEvalKit's can_infer (exact matching)
    mmbench_circular(right, groups, mains) -> [(group, hit)]   VLMEvalKit's CircularEval
    lenient_choice(text, choices) -> letter | None     NOT official: opt-in, reported as lenient/<metric>
Image metrics on (N, D) features from an encoder of your choice (`image_metrics.py`):
    clip_score(image_feats, text_feats), fid(feats_a, feats_b), dino_score(feats_a, feats_b),
    gaussian_stats(feats), frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
Benchmarks (`readers.py`, `benchmarks.py`), names in BENCHMARKS:
    items = read_benchmark(name, *files)               e.g. read_benchmark("gqa", questions_jsonl, image_dir,
                                                       answers_json); or the read_<name> functions directly
    Item: question_id, prompt, image (path | bytes | None), answers, meta, source ('file:line'), key (unique),
          load_image() -> PIL RGB image
    score(name, predictions, items, lenient=False) -> dict[str, float]
                                                       predictions: list aligned with items or {item.key: text}
    answer_record(item, text, model_id) / write_answers(path, records, append) / read_answers(path)
    align_answers(records, items) -> list[str]         a LLaVA answer file back onto items

Example:
    items = read_benchmark("pope", "llava_pope_test.jsonl", "val2014", "pope/coco")
    texts = [my_model(it.load_image(), it.prompt) for it in items]
    write_answers("answers/pope.jsonl", [answer_record(it, t, "genllava") for it, t in zip(items, texts)])
    score("pope", texts, items)   # {'accuracy': ..., 'f1': ..., 'adversarial/f1': ..., ...}
"""

from genllava_jax.evaluate.benchmarks import READERS, SCORERS, read_benchmark, score
from genllava_jax.evaluate.image_metrics import clip_score, dino_score, fid, frechet_distance, gaussian_stats
from genllava_jax.evaluate.readers import (
    Item,
    align_answers,
    answer_record,
    read_answers,
    read_gqa,
    read_mmbench,
    read_mme,
    read_pope,
    read_scienceqa,
    read_seed,
    read_textvqa,
    read_vqav2,
    write_answers,
)
from genllava_jax.evaluate.choice import lenient_choice, mmbench_choice, mmbench_circular, scienceqa_choice, seed_right
from genllava_jax.evaluate.scorers import (
    gqa_match,
    mme_scores,
    normalize_answer,
    pope_metrics,
    vqa_accuracy,
    vqav2_accuracy,
)

BENCHMARKS = tuple(SCORERS)

__all__ = [
    "BENCHMARKS", "READERS", "SCORERS", "read_benchmark", "score",
    "clip_score", "dino_score", "fid", "frechet_distance", "gaussian_stats",
    "Item", "align_answers", "answer_record", "read_answers", "write_answers",
    "read_gqa", "read_mmbench", "read_mme", "read_pope", "read_scienceqa", "read_seed", "read_textvqa", "read_vqav2",
    "gqa_match", "lenient_choice", "mmbench_choice", "mmbench_circular", "mme_scores", "normalize_answer",
    "pope_metrics", "scienceqa_choice", "seed_right", "vqa_accuracy", "vqav2_accuracy",
]
