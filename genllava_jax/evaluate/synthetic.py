"""Benchmark files in LLaVA's official layouts, written from a synthetic world (`data.synthetic`), for sweeps and
benchmarks that must run without the real datasets.

    gqa  = write_gqa(world_dir, out_dir)    # (questions.jsonl, image_folder, answers.json): read_benchmark("gqa", *gqa)
    pope = write_pope(world_dir, out_dir)   # (llava_pope_test.jsonl, image_folder, annotation_dir)

Questions are about the world's rendered images (`<world>/images/<scene name>_<variant>.png`), answers from the
scene the file name encodes, so a trained demo model can be scored on them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from genllava_jax.data.synthetic import COLOURS, KINDS, QUESTIONS, Scene, scene_of

GQA_SUFFIX = "Answer the question using a single word or phrase."  # what LLaVA appends to GQA questions


def scenes(world_dir, eval_only: bool = True) -> list[tuple[str, Scene]]:
    """(image path relative to the world dir, scene) of its images, sorted; `eval_only`: the held-out scenes of
    eval.jsonl only."""
    world = Path(world_dir)
    if eval_only:
        records = [json.loads(line) for line in (world / "eval.jsonl").read_text().splitlines() if line.strip()]
        names = sorted({r[k] for r in records for k in ("image", "target_image") if k in r})
    else:
        names = sorted(f"images/{p.name}" for p in (world / "images").glob("*.png"))
    if not names:
        raise ValueError(f"{world}: no images found")
    return [(n, scene_of(n)) for n in names]


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_gqa(world_dir, out_dir, n: int | None = None, *, suffix: str = "", seed: int = 0,
              eval_only: bool = True) -> tuple[str, str, str]:
    """GQA layout: question JSONL (question_id, image, text) and answers JSON ({question_id: {"answer"}}).
    One question a scene (cycling the world's questions), `n` of them (default: one per scene)."""
    rng = random.Random(seed)
    pool = scenes(world_dir, eval_only)
    qs, answers = [], {}
    for i in range(len(pool) if n is None else n):
        image, scene = pool[i % len(pool)]
        question, answer = rng.choice(QUESTIONS)
        qid = f"q{i:05d}"
        qs.append({"question_id": qid, "image": image, "text": f"{question}\n{suffix}".strip()})
        answers[qid] = {"answer": answer(scene)}
    out = Path(out_dir) / "gqa"
    _jsonl(out / "questions.jsonl", qs)
    (out / "answers.json").write_text(json.dumps(answers))
    return str(out / "questions.jsonl"), str(world_dir), str(out / "answers.json")


def write_pope(world_dir, out_dir, n: int | None = None, *, seed: int = 0,
               eval_only: bool = True) -> tuple[str, str, str]:
    """POPE layout: `llava_pope_test.jsonl` (question_id, image, text, category) and `coco/coco_pope_<category>.json`
    labels in the same order. 'random' asks about a colour, 'adversarial' about a kind; half the answers are yes."""
    rng = random.Random(seed)
    pool = scenes(world_dir, eval_only)
    qs, labels = [], {"random": [], "adversarial": []}
    for i in range(len(pool) if n is None else n):
        image, scene = pool[i % len(pool)]
        yes = i % 2 == 0
        if i % 4 < 2:
            cat, thing = "random", (scene.colour if yes else rng.choice([c for c in COLOURS if c != scene.colour]))
            text = f"Is there a {thing} shape in the image?"
        else:
            cat, thing = "adversarial", (scene.kind if yes else rng.choice([k for k in KINDS if k != scene.kind]))
            text = f"Is there a {thing} in the image?"
        qs.append({"question_id": i, "image": image, "text": text, "category": cat})
        labels[cat].append({"question_id": i, "image": image, "text": text, "label": "yes" if yes else "no"})
    out = Path(out_dir) / "pope"
    _jsonl(out / "llava_pope_test.jsonl", qs)
    for cat, rows in labels.items():
        _jsonl(out / "coco" / f"coco_pope_{cat}.json", rows)
    return str(out / "llava_pope_test.jsonl"), str(world_dir), str(out / "coco")


def _records(world_dir, task: str, eval_only: bool) -> list[dict]:
    world = Path(world_dir)
    files = ["eval.jsonl"] if eval_only else ["eval.jsonl", "train.jsonl"]
    out = [json.loads(line) for f in files for line in (world / f).read_text().splitlines() if line.strip()]
    return [r for r in out if r.get("task") == task]


def write_t2i(world_dir, out_dir, n: int = 8, *, eval_only: bool = True) -> tuple[str, str]:
    """t2i layout: a JSONL of {id, prompt, caption} from the world's t2i records and a reference folder of the
    world's images (for FID): (captions.jsonl, reference folder)."""
    recs = _records(world_dir, "t2i", eval_only)[:n]
    if len(recs) < n:
        raise ValueError(f"{world_dir}: only {len(recs)} t2i records")
    out = Path(out_dir) / "t2i"
    _jsonl(out / "captions.jsonl", [{"id": f"t{i}", "prompt": r["conversations"][0]["value"],
                                     "caption": r["caption"]} for i, r in enumerate(recs)])
    ref = out / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    for r in recs:
        (ref / Path(r["target_image"]).name).write_bytes((Path(world_dir) / r["target_image"]).read_bytes())
    return str(out / "captions.jsonl"), str(ref)


def write_edit(world_dir, out_dir, n: int = 8, *, eval_only: bool = True) -> tuple[str, str]:
    """MagicBrush-style layout: a JSONL of {id, source, instruction, target, caption} with paths relative to the
    world dir: (edits.jsonl, world dir)."""
    recs = _records(world_dir, "edit", eval_only)[:n]
    if len(recs) < n:
        raise ValueError(f"{world_dir}: only {len(recs)} edit records")
    out = Path(out_dir) / "edit"
    _jsonl(out / "edits.jsonl", [{"id": f"e{i}", "source": r["image"], "target": r["target_image"],
                                  "instruction": r["conversations"][0]["value"].replace("<image>", "").strip(),
                                  "caption": r["caption"]} for i, r in enumerate(recs)])
    return str(out / "edits.jsonl"), str(world_dir)
