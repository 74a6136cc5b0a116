"""Readers for LLaVA's evaluation files, giving uniform `Item`s, and LLaVA's answer JSONL out and in.

The layouts are those of LLaVA-1.5's `playground/data/eval` (question JSONL with question_id/image/text[/category],
an image folder, and each benchmark's own answer or annotation file); `read_*` docstrings name the files. Answer
files are optional: without them (test splits) items carry no references and can be run but not scored.
Malformed input raises ValueError naming the file and line (`path:line`) or key.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import os
import re
import sys
import uuid
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

from genllava_jax.evaluate.choice import LETTERS

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark question.

    question_id: as in the file (LLaVA answer files repeat it). image: a path, encoded image bytes (MMBench), or
    None (text-only ScienceQA questions). prompt: the user text as LLaVA feeds it after the image token, post-prompt
    included. answers: reference answer(s) (VQA: the ten human answers; multiple choice: the letter; empty when the
    split has none). meta: per-benchmark extras (category, choices, round, group, ...). source: `file:line`.
    key: unique within the list; `question_id`, plus `@round` for rotated MMBench rounds and `#n` for the n-th
    repeat of an id (TextVQA's ids are image ids, so they repeat).
    """

    question_id: Any
    prompt: str
    image: str | bytes | None
    answers: tuple[str, ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""
    key: str = ""

    def load_image(self):
        """The image as an RGB PIL image (None for text-only questions)."""
        from PIL import Image

        if self.image is None:
            return None
        if isinstance(self.image, bytes):
            return Image.open(io.BytesIO(self.image)).convert("RGB")
        if not os.path.exists(self.image):
            raise FileNotFoundError(f"{self.source}: image {self.image} not found")
        return Image.open(self.image).convert("RGB")


def base_key(question_id, round_id=None) -> str:
    return f"{question_id}@{round_id}" if round_id else str(question_id)


def _with_keys(items: list[Item]) -> list[Item]:
    seen: Counter = Counter()
    out = []
    for it in items:
        k = base_key(it.question_id, it.meta.get("round"))
        out.append(dataclasses.replace(it, key=f"{k}#{seen[k]}" if seen[k] else k))
        seen[k] += 1
    return out


# --- file helpers ---------------------------------------------------------------------------------------------------


def _jsonl(path) -> Iterator[tuple[str, dict]]:
    """(`path:line`, record) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def _json(path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _need(rec: Mapping, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; has {sorted(rec)}")


def _questions(path, image_folder, extra: Sequence[str] = ()) -> Iterator[tuple[str, dict, str]]:
    """LLaVA question JSONL lines: (where, record, image path)."""
    for where, q in _jsonl(path):
        _need(q, ("question_id", "image", "text", *extra), where)
        yield where, q, os.path.join(image_folder, q["image"])


def _choices_from_prompt(text: str) -> list[str]:
    """Options written one a line ("A. dog") or inline ("Options: (A) dog (B) cat")."""
    lines = re.findall(r"^([A-J])\. (.*)$", text, re.M)
    if lines:
        return [t.strip() for _, t in lines]
    inline = re.findall(r"\(([A-J])\) (.*?)(?= \([A-J]\) |\n|$)", text)
    return [t.strip() for _, t in inline]


# --- VQA-style ------------------------------------------------------------------------------------------------------


def read_vqav2(questions, image_folder, annotations=None) -> list[Item]:
    """`llava_vqav2_mscoco_{test-dev2015,val2014}.jsonl` + COCO images; answers from the official
    `v2_mscoco_val2014_annotations.json` ({"annotations": [{question_id, answers: [{answer}], answer_type}]})."""
    ann = {}
    if annotations is not None:
        data = _json(annotations)
        if not isinstance(data, dict) or "annotations" not in data:
            raise ValueError(f"{annotations}: expected a JSON object with an 'annotations' list")
        for i, a in enumerate(data["annotations"]):
            _need(a, ("question_id", "answers"), f"{annotations}: annotations[{i}]")
            ann[str(a["question_id"])] = a
    items = []
    for where, q, image in _questions(questions, image_folder):
        answers, meta = (), {"category": q.get("category")}
        if annotations is not None:
            a = ann.get(str(q["question_id"]))
            if a is None:
                raise ValueError(f"{where}: question_id {q['question_id']!r} not in {annotations}")
            answers = tuple(x["answer"] for x in a["answers"])
            meta.update(answer_type=a.get("answer_type"), question_type=a.get("question_type"))
        items.append(Item(q["question_id"], q["text"], image, answers, meta, where))
    return _with_keys(items)


def textvqa_question(prompt: str) -> str:
    """The bare question in a LLaVA TextVQA prompt, lower-cased (LLaVA's eval_textvqa.py `prompt_processor`)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise ValueError(f"TextVQA prompt has 'OCR tokens' but no 'Question: ... Short answer:': {prompt!r}")
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"unrecognised TextVQA prompt layout ({len(lines)} lines): {prompt!r}")
    return question.lower()


def read_textvqa(questions, image_folder, annotations=None) -> list[Item]:
    """`llava_textvqa_val_v051_ocr.jsonl` + `train_images/`; answers from `TextVQA_0.5.1_val.json` ({"data": [...]}).

    As LLaVA's eval_textvqa.py, a question is matched by (question_id as the image id, its lower-cased question);
    a question_id equal to an annotation's question_id also matches."""
    by_text, by_qid = {}, {}
    if annotations is not None:
        data = _json(annotations)
        if not isinstance(data, dict) or "data" not in data:
            raise ValueError(f"{annotations}: expected a JSON object with a 'data' list")
        for i, a in enumerate(data["data"]):
            _need(a, ("image_id", "question", "answers"), f"{annotations}: data[{i}]")
            by_text[(str(a["image_id"]), a["question"].lower())] = a
            if "question_id" in a:
                by_qid[str(a["question_id"])] = a
    items = []
    for where, q, image in _questions(questions, image_folder):
        answers = ()
        if annotations is not None:
            try:
                question = textvqa_question(q["text"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            a = by_text.get((str(q["question_id"]), question)) or by_qid.get(str(q["question_id"]))
            if a is None:
                raise ValueError(f"{where}: no annotation in {annotations} for image {q['question_id']!r} and "
                                 f"question {question!r}")
            answers = tuple(a["answers"])
        items.append(Item(q["question_id"], q["text"], image, answers, {"category": q.get("category")}, where))
    return _with_keys(items)


def read_gqa(questions, image_folder, answers=None) -> list[Item]:
    """`llava_gqa_testdev_balanced.jsonl` + GQA images; answers from `testdev_balanced_questions.json`
    ({question_id: {"answer": ...}})."""
    gold = _json(answers) if answers is not None else None
    if gold is not None and not isinstance(gold, dict):
        raise ValueError(f"{answers}: expected a JSON object keyed by question id")
    items = []
    for where, q, image in _questions(questions, image_folder):
        ref, meta = (), {"category": q.get("category")}
        if gold is not None:
            g = gold.get(str(q["question_id"]))
            if g is None or "answer" not in g:
                raise ValueError(f"{where}: question_id {q['question_id']!r} has no answer in {answers}")
            ref = (g["answer"],)
            structural = (g.get("types") or {}).get("structural")
            if structural is not None:  # eval.py's binary/open split
                meta["answer_kind"] = "open" if structural == "query" else "binary"
        items.append(Item(q["question_id"], q["text"], image, ref, meta, where))
    return _with_keys(items)


def read_pope(questions, image_folder, annotation_dir=None) -> list[Item]:
    """`llava_pope_test.jsonl` (with category adversarial/popular/random) + COCO val2014 images; labels from
    `annotation_dir/coco_pope_<category>.json` (JSON lines with text and label).

    As LLaVA's eval_pope.py, a category's questions and labels are paired in file order; each label's text must
    begin the question's text, so a reordered file fails instead of scoring wrong."""
    rows = list(_questions(questions, image_folder, extra=("category",)))
    labels: dict[str, list[tuple[str, dict]]] = {}
    if annotation_dir is not None:
        for cat in dict.fromkeys(q["category"] for _, q, _ in rows):
            path = os.path.join(annotation_dir, f"coco_pope_{cat}.json")
            labels[cat] = list(_jsonl(path))
            for where, rec in labels[cat]:
                _need(rec, ("text", "label"), where)
    used: Counter = Counter()
    items = []
    for where, q, image in rows:
        cat, ref = q["category"], ()
        if annotation_dir is not None:
            i = used[cat]
            used[cat] += 1
            if i >= len(labels[cat]):
                raise ValueError(f"{where}: more '{cat}' questions than labels in coco_pope_{cat}.json")
            lwhere, lab = labels[cat][i]
            if not q["text"].startswith(lab["text"]):
                raise ValueError(f"{where}: question {q['text']!r} does not match its label line {lwhere} "
                                 f"({lab['text']!r}); POPE pairs them in order")
            ref = (lab["label"],)
        items.append(Item(q["question_id"], q["text"], image, ref, {"category": cat}, where))
    for cat, labs in labels.items():
        if used[cat] != len(labs):
            raise ValueError(f"{questions}: {used[cat]} '{cat}' questions but {len(labs)} labels in "
                             f"coco_pope_{cat}.json")
    return _with_keys(items)


# --- MME ------------------------------------------------------------------------------------------------------------


def _mme_truth(root) -> dict[tuple[str, str, str], str]:
    """(category, <image stem>.txt, question) -> answer from MME_Benchmark_release_version's tab-separated files."""
    truth = {}
    for cat in sorted(os.listdir(root)):
        d = os.path.join(root, cat)
        if not os.path.isdir(d):
            continue
        qa = os.path.join(d, "questions_answers_YN") if os.path.isdir(os.path.join(d, "images")) else d
        if not os.path.isdir(qa):
            raise ValueError(f"{d}: has images/ but no questions_answers_YN/")
        for name in sorted(os.listdir(qa)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa, name)
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"{path}:{n}: expected 'question<TAB>answer', got {line.strip()!r}")
                    truth[(cat, name, parts[0])] = parts[1]
    return truth


def read_mme(questions, image_folder, gt_dir=None) -> list[Item]:
    """`llava_mme.jsonl` (question_id '<category>/<image>') + `MME_Benchmark_release_version/`, whose per-image
    .txt files hold the yes/no answers (gt_dir defaults to the image folder). Questions are matched to them as in
    LLaVA's convert_answer_to_mme.py: LLaVA's post-prompt removed, " Please answer yes or no." ensured."""
    truth = _mme_truth(gt_dir or image_folder)
    items = []
    for where, q, image in _questions(questions, image_folder):
        qid = str(q["question_id"])
        cat = q.get("category") or qid.split("/")[0]
        txt = qid.split("/")[-1].split(".")[0] + ".txt"
        question = q["text"].replace("Answer the question using a single word or phrase.", "").strip()
        if "Please answer yes or no." not in question:
            question += " Please answer yes or no."
            if (cat, txt, question) not in truth:  # some MME files have two spaces before it
                question = question.replace(" Please answer yes or no.", "  Please answer yes or no.")
        ref = ()
        if truth:
            if (cat, txt, question) not in truth:
                raise ValueError(f"{where}: no answer for ({cat}, {txt}, {question!r}) in {gt_dir or image_folder}")
            ref = (truth[(cat, txt, question)],)
        items.append(Item(q["question_id"], q["text"], image, ref, {"category": cat, "image_id": f"{cat}/{txt}"},
                          where))
    return _with_keys(items)


# --- multiple choice ------------------------------------------------------------------------------------------------


def read_scienceqa(questions, image_folder, problems=None, single_pred_prompt: bool = True) -> list[Item]:
    """`llava_test_CQM-A.json` (a JSON list of {id, conversations, image?}) + `test/` images; answers and choices
    from ScienceQA's `problems.json` ({pid: {choices, answer: index}}). The prompt is the first human turn without
    `<image>`, plus LLaVA-1.5's single-letter instruction when `single_pred_prompt`; the answer file's prompt
    (meta['answer_prompt']) starts with "<image>\n" for questions with an image, as model_vqa_science.py writes it:
    eval_science_qa.py finds the IMG split by it."""
    data = _json(questions)
    if not isinstance(data, list):
        raise ValueError(f"{questions}: expected a JSON list of questions")
    probs = _json(problems) if problems is not None else None
    items = []
    for i, q in enumerate(data):
        where = f"{questions}: [{i}]"
        _need(q, ("id", "conversations"), where)
        if not q["conversations"] or "value" not in q["conversations"][0]:
            raise ValueError(f"{where}: conversations[0] has no 'value'")
        prompt = q["conversations"][0]["value"].replace("<image>", "").strip()
        if single_pred_prompt:
            prompt += "\n" + SINGLE_PRED_PROMPT
        choices, ref = _choices_from_prompt(prompt), ()
        if probs is not None:
            p = probs.get(str(q["id"]))
            if p is None or "choices" not in p or "answer" not in p:
                raise ValueError(f"{where}: id {q['id']!r} has no problem with choices and answer in {problems}")
            choices, ref = list(p["choices"]), (LETTERS[p["answer"]],)
        image = os.path.join(image_folder, q["image"]) if q.get("image") else None
        meta = {"choices": choices, "has_image": image is not None,
                "answer_prompt": ("<image>\n" if image is not None else "") + prompt}
        items.append(Item(q["id"], prompt, image, ref, meta, where))
    return _with_keys(items)


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none"))


def read_mmbench(tsv, all_rounds: bool = False, single_pred_prompt: bool = True) -> list[Item]:
    """MMBench TSV (index, question, hint, A, B, ..., answer, category, l2-category, image as base64).

    Prompts are built as LLaVA's model_vqa_mmbench.py: hint, question, "A. option" lines, the letter instruction.
    `all_rounds` adds LLaVA's rotations (round r shifts the options by r, letters stay A, B, ...). meta['group'] is
    index mod 1e6, since the official TSVs store circular copies at index + k·1e6: items of a group are scored
    together by CircularEval, once per main item (meta['main']: index < 1e6, round 0). An image field of digits
    (VLMEvalKit's shared images) points at that row's image."""
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's default field limit
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        for col in ("index", "question", "A", "B"):
            if col not in header:
                raise ValueError(f"{tsv}:1: missing column {col!r}; has {header}")
        rows = [(f"{tsv}:{n}", row) for n, row in enumerate(reader, 2)]
    option_cols = [c for c in LETTERS if c in header]
    images = {row["index"]: row.get("image") for _, row in rows}
    items = []
    for where, row in rows:
        options = []
        for c in option_cols:
            if _blank(row[c]):
                break
            options.append(row[c])
        image = row.get("image")
        if image and len(image) <= 64 and image.isdigit() and not _blank(images.get(image)):
            image = images[image]
        try:
            image_bytes = base64.b64decode(image, validate=True) if not _blank(image) else None
        except ValueError:
            raise ValueError(f"{where}: column 'image' is not base64") from None
        answer = None if _blank(row.get("answer")) else row["answer"].strip()
        if answer is not None and answer not in LETTERS[: len(options)]:
            raise ValueError(f"{where}: answer {answer!r} is not one of the {len(options)} option letters")
        try:
            index = int(row["index"])
        except ValueError:
            raise ValueError(f"{where}: index {row['index']!r} is not an integer") from None
        for r in range(len(options) if all_rounds else 1):
            opts = options[r:] + options[:r]
            prompt = row["question"] if _blank(row.get("hint")) else row["hint"] + "\n" + row["question"]
            for letter, opt in zip(LETTERS, opts):
                prompt += f"\n{letter}. {opt}"
            if single_pred_prompt:
                prompt += "\n" + SINGLE_PRED_PROMPT
            ref = () if answer is None else (LETTERS[(LETTERS.index(answer) - r) % len(options)],)
            meta = {"choices": opts, "round": r, "group": index % 1_000_000, "main": index < 1_000_000 and r == 0,
                    **{k: None if _blank(row.get(k)) else row[k] for k in ("category", "l2-category")}}
            items.append(Item(index, prompt, image_bytes, ref, meta, where))
    return _with_keys(items)


def read_seed(questions, image_folder, annotations=None) -> list[Item]:
    """`llava-seed-bench.jsonl` + SEED-Bench images (video questions use extracted frames); answers, choices and
    question types from `SEED-Bench.json` ({"questions": [{question_id, answer, choice_a.., question_type_id,
    data_type}], "question_type": {name: id}})."""
    ann, type_names = {}, {}
    if annotations is not None:
        data = _json(annotations)
        if not isinstance(data, dict) or "questions" not in data:
            raise ValueError(f"{annotations}: expected a JSON object with a 'questions' list")
        type_names = {v: k for k, v in data.get("question_type", {}).items()}
        for i, a in enumerate(data["questions"]):
            _need(a, ("question_id", "answer"), f"{annotations}: questions[{i}]")
            ann[str(a["question_id"])] = a
    items = []
    for where, q, image in _questions(questions, image_folder):
        choices, ref, meta = _choices_from_prompt(q["text"]), (), {"category": q.get("category")}
        if annotations is not None:
            a = ann.get(str(q["question_id"]))
            if a is None:
                raise ValueError(f"{where}: question_id {q['question_id']!r} not in {annotations}")
            opts = [a[f"choice_{c}"] for c in "abcdefghij" if f"choice_{c}" in a]
            choices, ref = opts or choices, (a["answer"],)
            meta.update(question_type=type_names.get(a.get("question_type_id"), a.get("question_type_id")),
                        data_type=a.get("data_type", "image"))
        items.append(Item(q["question_id"], q["text"], image, ref, {**meta, "choices": choices}, where))
    return _with_keys(items)


# --- answers --------------------------------------------------------------------------------------------------------


def answer_record(item: Item, text: str, model_id: str) -> dict:
    """One line of LLaVA's answer JSONL. answer_id is derived from (model, key, text), so re-runs write the same
    file; MMBench rounds also carry round_id as LLaVA's do; the prompt is what LLaVA's script writes there
    (ScienceQA's keeps `<image>`)."""
    rec = {"question_id": item.question_id, "prompt": item.meta.get("answer_prompt", item.prompt), "text": text,
           "answer_id": uuid.uuid5(uuid.NAMESPACE_OID, f"{model_id}\0{item.key}\0{text}").hex[:22],
           "model_id": model_id, "metadata": {}}
    if "round" in item.meta:
        rec["round_id"] = item.meta["round"]
    return rec


def write_answers(path, records: Sequence[Mapping], append: bool = False) -> None:
    """Write (or append) answer records, one JSON object a line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_answers(path) -> list[dict]:
    """LLaVA answer JSONL (ours or LLaVA's own); each line needs question_id and text."""
    out = []
    for where, rec in _jsonl(path):
        _need(rec, ("question_id", "text"), where)
        out.append(rec)
    return out


def align_answers(records: Sequence[Mapping], items: Sequence[Item]) -> list[str]:
    """The answer text for each item, matched by key: question_id (+ round_id), the n-th repeat of an id taking the
    n-th answer with it (LLaVA writes answers in question order)."""
    seen: Counter = Counter()
    texts: dict[str, str] = {}
    for r in records:
        k = base_key(r["question_id"], r.get("round_id"))
        texts[f"{k}#{seen[k]}" if seen[k] else k] = r["text"]
        seen[k] += 1
    missing = [it.key for it in items if it.key not in texts]
    if missing:
        raise ValueError(f"{len(missing)} of {len(items)} items have no answer, e.g. {missing[:5]}")
    return [texts[it.key] for it in items]

