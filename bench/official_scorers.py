"""Our benchmark scorers vs the official scoring code itself, on real and generated answers.

    python -m venv /tmp/official && /tmp/official/bin/pip install numpy pandas scikit-learn openpyxl tqdm pillow
    git clone https://github.com/haotian-liu/LLaVA; git clone https://github.com/open-compass/VLMEvalKit
    git clone https://github.com/GT-Vision-Lab/VQA
    git clone https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models MME
    PYTHONPATH=. /tmp/official/bin/python bench/official_scorers.py --llava=LLaVA --vlmevalkit=VLMEvalKit --vqa=VQA \
        --mme=MME [--n 3000] [--print_only]

Nothing official is copied here: each file is read from the given git repositories at a pinned commit (`git show`)
and run as its authors run it (a script in a subprocess) or imported (its functions; VLMEvalKit's logger and I/O
helpers stubbed). The real answers are LLaVA-1.5-13B's own answer files, committed in LLaVA's history
(`playground/data/eval`, commit 32cebc3); references they lack (POPE labels, MME/GQA/TextVQA answers) are drawn at
random, which exercises the same parsing. Generated answers combine fragments that hit each rule's edge cases.
GQA's `eval.py` is not on GitHub: its accuracy is `predicted == gold` after LLaVA's `convert_gqa_for_eval.py`, run here.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import random
import re
import string
import subprocess
import sys
import tempfile
import types
import zipfile
from collections import defaultdict
from pathlib import Path

from genllava_jax import evaluate as ev
from genllava_jax.evaluate import choice

LLAVA, LLAVA_DATA = "c121f0432da27facab705978f83c4ada465e46fd", "32cebc3809441cc40d8ac7b2855d148308741f2a"
VLMEVALKIT = "e8e78f05f3080fe28154f2130321f17951c3be94"
VQA = "a013f0043c1e2cdc995922dfe257f7149aa9af06"
MME = "1c1d69e138b57cf8b0400427927bfb8ed4285458"  # Awesome-MLLM, Evaluation branch: tools/eval_tool.zip
FRAG = ["A", "B", "C", "D", "E", "F", "Z", "a", "b", "The answer is B.", "The answer is C", "The answer is D\n",
        "the answer is a", "answer is **D**", "The correct answer is **B**", "(B)", "B.", "A. dog", "C. cat", "B\n",
        "\n", " ", "cat", "dog", "red bird", "bird", "Cannot determine the answer", "I think", "it is", "the", "yes",
        "no", "No", "not", "Not", "NO", "Yes,", ",", ".", "2", "two", "Two.", "1,000", "a.m.", "it's", "dont", "Im",
        "(", ")", "-", "?", "!", "Answer:", "option", "none", "ten", "yes.", "  ", "\t", "AB", "Failed to obtain "
        "answer via API", "I'm sorry, but without the image provided", "*", "#", "[C]", "{A}", "Z.", "E.", "Option B",
        "B or C", "first", "an", "3,000", "x-y", "it's red", "a dog", "Yes", "nope", "no.", "No,", "there is no"]


class Official:
    """Files of the official repositories, written under one temporary directory."""

    def __init__(self, args):
        self.args, self.dir = args, Path(tempfile.mkdtemp(prefix="official-"))

    def file(self, repo: str, commit: str, path: str) -> Path:
        out = self.dir / repo / commit[:8] / path
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(subprocess.run(["git", "-C", getattr(self.args, repo), "show", f"{commit}:{path}"],
                                           capture_output=True, check=True).stdout)
        return out

    def module(self, repo: str, commit: str, path: str, fix=None):
        src = self.file(repo, commit, path)
        if fix is not None:
            src.write_text(fix(src.read_text()))
        spec = importlib.util.spec_from_file_location(src.stem, src)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def run(cmd, cwd=None) -> str:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, check=True).stdout


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scienceqa(off, rng, text, n):
    out = json.loads(off.file("llava", LLAVA_DATA, "playground/data/eval/scienceqa/answers/"
                                                    "llava-v1.5-13b_output.jsonl").read_text())
    real = out["correct"] + out["incorrect"]
    bad = sum(choice.scienceqa_choice(r["pred"], 5) != (r["parsed_ans"] if r["parsed_ans"] in "ABCDE" else None)
              for r in real)
    yield "ScienceQA: parsed letter, LLaVA-1.5-13B's answers (its own eval output)", len(real), bad
    d = Path(tempfile.mkdtemp(dir=off.dir))
    problems, qs, texts = {}, [], []
    for i in range(n):
        k = rng.randint(2, 5)
        problems[str(i)] = {"choices": [f"opt{j}" for j in range(k)], "answer": rng.randrange(k)}
        value = "Question?\n" + "\n".join(f"{'ABCDE'[j]}. opt{j}" for j in range(k))
        q = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if i % 3 else "") + value}]}
        if i % 3:
            q["image"] = f"{i}/image.png"
        qs.append(q)
        texts.append(text())
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    (d / "q.json").write_text(json.dumps(qs))
    items = ev.read_scienceqa(d / "q.json", d, d / "problems.json")
    ev.write_answers(d / "a.jsonl", [ev.answer_record(it, t, "m") for it, t in zip(items, texts)])  # ours
    printed = run([sys.executable, off.file("llava", LLAVA, "llava/eval/eval_science_qa.py"), "--base-dir", d,
                   "--result-file", d / "a.jsonl", "--output-file", d / "o.json", "--output-result", d / "r.json"])
    theirs = json.loads((d / "r.json").read_text())["results"]
    bad = 0
    for it, t in zip(items, texts):
        c = choice.scienceqa_choice(t, len(it.meta["choices"]))
        bad += theirs[it.question_id] != ("ABCDE".index(c) if c else -1)
    yield "ScienceQA: parsed answer index, generated answers", n, bad
    m = ev.score("scienceqa", texts, items)
    want = f"Accuracy: {m['accuracy'] * 100:.2f}%, IMG-Accuracy: {m['img_accuracy'] * 100:.2f}%"
    yield "ScienceQA: Accuracy and IMG-Accuracy from our answer file", 1, int(want not in printed)


def seed(off, rng, text, n):
    d = Path(tempfile.mkdtemp(dir=off.dir))
    ann = {"question_type": {f"type{k}": k for k in range(1, 4)}, "questions": []}
    qs, texts = [], []
    for i in range(n):
        a = {"question_id": str(i), "answer": rng.choice("ABCD"), "question_type_id": rng.randint(1, 3),
             "data_type": rng.choice(["image", "video"]), **{f"choice_{c}": f"opt {c}" for c in "abcd"}}
        ann["questions"].append(a)
        qs.append({"question_id": i, "image": "x.png", "text": "Q?\nA. opt a\nB. opt b\nC. opt c\nD. opt d"})
        texts.append(rng.choice([text(2), a["answer"], rng.choice("ABCD")]))
    (d / "SEED-Bench.json").write_text(json.dumps(ann))
    items = ev.read_seed(jsonl(d / "q.jsonl", qs), d, d / "SEED-Bench.json")
    ev.write_answers(d / "a.jsonl", [ev.answer_record(it, t, "m") for it, t in zip(items, texts)])
    printed = run([sys.executable, off.file("llava", LLAVA, "scripts/convert_seed_for_submission.py"),
                   "--annotation-file", d / "SEED-Bench.json", "--result-file", d / "a.jsonl",
                   "--result-upload-file", d / "up.jsonl"])
    m = ev.score("seed", texts, items)
    want = [f"Total accuracy: {100 * m['accuracy']:.2f}%", f"image accuracy: {100 * m['image_accuracy']:.2f}%",
            f"video accuracy: {100 * m['video_accuracy']:.2f}%"]
    want += [f"type{k}: {100 * m[f'accuracy/type{k}']:.2f}%" for k in range(1, 4)]
    yield f"SEED-Bench: printed accuracies (total, image, video, 3 types), {n} generated answers", len(want), sum(
        w not in printed for w in want)


def mmbench(off, rng, text, n):
    import numpy as np
    import pandas as pd

    log = types.ModuleType("vlmeval.smp.log")
    log.get_logger = lambda name: types.SimpleNamespace(info=lambda *a: None, warning=lambda *a: None)
    sys.modules.update({"vlmeval": types.ModuleType("vlmeval"), "vlmeval.smp": types.ModuleType("vlmeval.smp"),
                        "vlmeval.smp.log": log})
    mu = off.module("vlmevalkit", VLMEVALKIT, "vlmeval/utils/matching_util.py")
    xl = pd.read_excel(off.file("llava", LLAVA_DATA, "playground/data/eval/mmbench/answers_upload/"
                                                     "mmbench_dev_20230712/llava-v1.5-13b.xlsx"))
    xl["prediction"] = [str(x) for x in xl["prediction"]]

    def options(row):
        return [str(row[c]) for c in "ABCD" if not pd.isna(row[c])]

    def same(t, opts):
        return (choice.mmbench_choice(t, opts) or False) == mu.can_infer(t, dict(zip("ABCD", opts)))

    yield "MMBench: can_infer, LLaVA-1.5-13B's dev answers", len(xl), sum(
        not same(r["prediction"], options(r)) for _, r in xl.iterrows())
    words = ["dog", "cat", "red bird", "blue", "a dog", "2", "The", "none", "A", "B c"]
    cases = [(text(), rng.sample(words, rng.randint(2, 4))) for _ in range(n)]
    cases += [(rng.choice(o) + rng.choice(["", ".", " is it", "!"]), o) for _, o in cases[: n // 3]]
    yield "MMBench: can_infer, generated answers", len(cases), sum(not same(t, o) for t, o in cases)

    # mcq_circular_eval under exact matching, with its file I/O kept in a dict
    tree = ast.parse(off.file("vlmevalkit", VLMEVALKIT, "vlmeval/dataset/utils/multiple_choice.py").read_text())
    keep = {"build_choices", "prefetch_answer", "prefetch_circular_group", "mcq_circular_eval", "report_acc"}
    store = {}
    g = {"pd": pd, "np": np, "string": string, "defaultdict": defaultdict, "can_infer": mu.can_infer,
         "osp": types.SimpleNamespace(exists=lambda p: p in store), "load": lambda p: store[p],
         "dump": lambda x, p: store.__setitem__(p, x), "istype": lambda x, t: isinstance(x, (int, np.integer)),
         "get_pred_file_format": lambda: "pkl", "timestr": lambda: "t", "logger": log.get_logger(""),
         "MMB_abbrs": {}}
    body = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name in keep]
    exec(compile(ast.Module(body, []), "multiple_choice.py", "exec"), g)

    def circular(df):
        store.clear()
        res = g["mcq_circular_eval"](None, df.copy(), df[["index", "question", "answer"]].copy(), 1, "r.pkl", "MMB")
        theirs = float(g["report_acc"](res)["Overall"][0])
        items = [ev.Item(int(r["index"]), "", None, (r["answer"],),
                         {"choices": options(r), "group": int(r["index"]) % 1_000_000,
                          "main": int(r["index"]) < 1_000_000}, key=str(r["index"])) for _, r in df.iterrows()]
        ours = ev.score("mmbench", list(df["prediction"]), items)["circular_accuracy"]
        return len(res), int(abs(theirs - ours) > 1e-12), theirs

    n_main, bad, acc = circular(xl)
    yield f"MMBench: CircularEval, LLaVA-1.5-13B's dev answers ({100 * acc:.1f} by both)", n_main, bad
    fuzzed = xl.copy()
    fuzzed["prediction"] = [str(rng.choice([p, text(2), rng.choice("ABCD"), r[rng.choice("ABCD")]]))
                            for p, (_, r) in zip(xl["prediction"], xl.iterrows())]
    n_main, bad, _ = circular(fuzzed)
    yield "MMBench: CircularEval, those answers partly replaced by generated ones", n_main, bad


def pope(off, rng, text, n):
    mod = off.module("llava", LLAVA, "llava/eval/eval_pope.py")
    real = [json.loads(line)["text"] for line in off.file(
        "llava", LLAVA_DATA, "playground/data/eval/pope/answers/llava-v1.5-13b.jsonl").read_text().splitlines()]
    names = {"Accuracy": "accuracy", "Precision": "precision", "Recall": "recall", "F1 score": "f1",
             "Yes ratio": "yes_ratio"}
    for name, texts in [("LLaVA-1.5-13B's answers", real), ("generated answers", [text(4) for _ in range(n)])]:
        labels = [rng.choice(["yes", "no"]) for _ in texts]
        path = jsonl(Path(tempfile.mkstemp(dir=off.dir)[1]), [{"label": lab} for lab in labels])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            mod.eval_pope([{"text": t} for t in texts], path)
        got = dict(re.findall(r"^(Accuracy|Precision|Recall|F1 score|Yes ratio): (.*)$", buf.getvalue(), re.M))
        mine = ev.pope_metrics(texts, labels)
        yield (f"POPE: 5 metrics over {len(texts)} {name} (random labels)", 5,
               sum(float(got[k]) != mine[v] for k, v in names.items()))


def vqa(off, rng, text, n):
    m4c = off.module("llava", LLAVA, "llava/eval/m4c_evaluator.py")
    py3 = lambda s: re.sub(r"^(\s*)print (.*)$", r"\1print(\2)", s, flags=re.M)  # noqa: E731  (a Python 2 file)
    vq = off.module("vqa", VQA, "PythonEvaluationTools/vqaEvaluation/vqaEval.py", fix=py3)
    pool = ["2", "two", "Two", "dog", "a dog", "the dog", "yes", "Yes.", "cat", "it's", "1,000", "1000", "red-white",
            "red white", "dont", "don't", "none", "0", "a.m.", "am", "x y", "(x)", " left ", "left"]
    real = [json.loads(line)["text"] for line in off.file(
        "llava", LLAVA_DATA, "playground/data/eval/textvqa/answers/llava-v1.5-13b.jsonl").read_text().splitlines()]
    cases = [(t, [rng.choice(pool + [t]) for _ in range(10)]) for t in real[:n]]
    cases += [(rng.choice(pool + [text(3)]), [rng.choice(pool) for _ in range(10)]) for _ in range(n)]
    cases += [(rng.choice(pool), [rng.choice(pool)] * 10) for _ in range(n // 5)]  # unanimous humans
    evaluator = m4c.TextVQAAccuracyEvaluator()
    with contextlib.redirect_stderr(io.StringIO()):
        bad = sum(abs(evaluator.eval_pred_list([{"pred_answer": t, "gt_answers": g}]) - ev.vqa_accuracy(t, g)) > 1e-12
                  for t, g in cases)
    yield "TextVQA: accuracy per question (m4c_evaluator), LLaVA-1.5-13B's + generated answers", len(cases), bad
    proc = m4c.EvalAIAnswerProcessor()  # LLaVA's convert_vqav2_for_submission.py
    gts = {q: {"answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(g)], "question_type": "q",
               "answer_type": "a"} for q, (_, g) in enumerate(cases)}
    res = {q: {"answer": proc(t)} for q, (t, _) in enumerate(cases)}
    e = vq.VQAEval(types.SimpleNamespace(qa=gts, getQuesIds=lambda: list(gts)), types.SimpleNamespace(qa=res), n=12)
    with contextlib.redirect_stdout(io.StringIO()):
        e.evaluate()
    bad = sum(abs(e.evalQA[q] / 100 - ev.vqav2_accuracy(t, g)) > 1e-9 for q, (t, g) in enumerate(cases))
    yield "VQAv2: accuracy per question (EvalAI processor + vqaEval.py), same answers", len(cases), bad


def gqa(off, rng, text, n):
    d = Path(tempfile.mkdtemp(dir=off.dir))
    real = [json.loads(line) for line in off.file("llava", LLAVA_DATA, "playground/data/eval/gqa/answers/"
                                                  "llava_gqa_testdev_balanced/llava-v1.5-13b.jsonl").read_text().splitlines()]
    rows = real[:n] + [{"question_id": f"g{i}", "text": text(2)} for i in range(n)]
    gold = [rng.choice([r["text"].lower(), r["text"].rstrip(".").lower(), "yes", "no", "left"]) for r in rows]
    run([sys.executable, off.file("llava", LLAVA, "scripts/convert_gqa_for_eval.py"),
         "--src", jsonl(d / "a.jsonl", rows), "--dst", d / "p.json"])
    preds = {p["questionId"]: p["prediction"] for p in json.loads((d / "p.json").read_text())}
    yield "GQA: match per question, LLaVA-1.5-13B's + generated answers", len(rows), sum(
        (preds[r["question_id"]] == g) != ev.gqa_match(r["text"], g) for r, g in zip(rows, gold))


def mme(off, rng, text, n):
    with zipfile.ZipFile(off.file("mme", MME, "tools/eval_tool.zip")) as z:
        z.extract("eval_tool/calculation.py", off.dir)
    convert = off.file("llava", LLAVA_DATA, "playground/data/eval/MME/convert_answer_to_mme.py")
    qs = [json.loads(line) for line in off.file("llava", LLAVA_DATA, "playground/data/eval/MME/llava_mme.jsonl")
          .read_text().splitlines()]
    real = [json.loads(line)["text"] for line in off.file(
        "llava", LLAVA_DATA, "playground/data/eval/MME/answers/llava-v1.5-13b.jsonl").read_text().splitlines()]
    for name, texts in [("LLaVA-1.5-13B's answers", real),
                        ("generated answers", [re.sub(r"\s", " ", text(3)) for _ in qs])]:
        d = Path(tempfile.mkdtemp(dir=off.dir))
        root = d / "MME_Benchmark_release_version"
        truth = defaultdict(list)  # random yes/no answers in MME's per-image .txt layout
        for q in qs:
            cat, stem = q["question_id"].split("/")[0], q["question_id"].split("/")[-1].split(".")[0]
            question = q["text"].replace("Answer the question using a single word or phrase.", "").strip()
            if "Please answer yes or no." not in question:
                question += " Please answer yes or no."
            truth[cat, stem].append(f"{question}\t{rng.choice(['Yes', 'No'])}\n")
        for (cat, stem), lines in truth.items():
            (root / cat).mkdir(parents=True, exist_ok=True)
            (root / cat / f"{stem}.txt").write_text("".join(lines))
        (d / "answers").mkdir()
        jsonl(d / "answers/x.jsonl", [{"question_id": q["question_id"], "prompt": q["text"], "text": t}
                                     for q, t in zip(qs, texts)])
        run([sys.executable, convert, "--experiment", "x"], cwd=d)
        printed = run([sys.executable, off.dir / "eval_tool/calculation.py",
                       "--results_dir", d / "eval_tool/answers/x"])
        theirs = {k: float(v) for k, v in re.findall(r"^\s+(\w+)  score: (\S+)$", printed, re.M)}
        totals = [float(v) for v in re.findall(r"^total score: (\S+)", printed, re.M)]
        mine = ev.score("mme", texts, ev.read_mme(jsonl(d / "q.jsonl", qs), root))
        bad = sum(abs(theirs[k] - mine[k]) > 1e-9 for k in theirs)
        bad += sum(abs(t - mine[k]) > 1e-9 for t, k in zip(totals, ("perception", "cognition")))
        yield f"MME: 14 subtask scores + 2 totals, {name} (random answers)", 16, bad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("llava", "vlmevalkit", "vqa", "mme"):
        p.add_argument(f"--{name}", required=True, help="a clone (or bare git directory) of the repository")
    p.add_argument("--n", type=int, default=3000, help="generated answers per check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print_only", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args()
    off, rng = Official(args), random.Random(args.seed)

    def text(k=6):
        seps = ["", " ", " ", "\n", ". ", ", "]
        out = "".join(rng.choice(FRAG) + rng.choice(seps) for _ in range(rng.randint(1, k)))
        return out.strip(rng.choice(["", " "]))

    rows = []
    for check in (scienceqa, seed, mmbench, pope, vqa, gqa, mme):
        for what, cases, bad in check(off, rng, text, args.n):
            rows.append((what, cases, bad))
            print(f"{'ok ' if bad == 0 else 'BAD'} {what}: {cases} cases, {bad} differ", flush=True)
    table = "| check | cases | differ |\n|---|---:|---:|\n" + "".join(f"| {w} | {c} | {b} |\n" for w, c, b in rows)
    if not args.print_only:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_util import record

        record("Scorers vs the official code", "PYTHONPATH=. /tmp/official/bin/python bench/official_scorers.py "
               "--llava=LLaVA --vlmevalkit=VLMEvalKit --vqa=VQA --mme=MME",
               ["checks", "cases", "differ"], [str(len(rows)), str(sum(r[1] for r in rows)),
                                               str(sum(r[2] for r in rows))], note=table)
    sys.exit(1 if any(b for _, _, b in rows) else 0)


if __name__ == "__main__":
    main()
