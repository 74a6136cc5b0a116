"""Benchmark scorers against cases written here, each expected result derived by reading the official code (the
commits are named in genllava_jax/evaluate/scorers.py and choice.py) and, where the rule is short, against its
logic transcribed in the test; readers on files in the official layouts, written here."""

import base64
import csv
import dataclasses
import io
import json
import random

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from genllava_jax import evaluate as ev
from genllava_jax.evaluate.scorers import mme_parse, pope_parse, process_digit_article, process_punctuation

# --- VQA ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    ("two", "2"), ("Ten.", "10"), ("none", "0"),            # number words
    ("a dog", "dog"), ("The Two dogs!", "2 dogs"), ("an apple", "apple"),  # articles, case, '!' -> space
    ("yes.", "yes"), ("Yes", "yes"), ("5.", "5"), ("2.5", "2.5"), ("a.m.", "am"),  # periods go unless before a digit
    ("1,000", "1000"), ("dog, cat", "dog cat"), ("red-white", "red white"), ("what?", "what"),
    ("dont", "don't"), ("cant stop", "can't stop"),  # contractions
    ("Im", "im"),  # the table's "Im" key is capitalised but text is lower-cased first, so it never applies
    ("  left\n", "left"), ("it's", "it 's"),                 # EvalAI's tokenisation splits 's
])
def test_normalize_answer(raw, norm):
    assert ev.normalize_answer(raw) == norm


def test_punctuation_comma_in_number_rule():
    # A comma between digits anywhere makes every mark vanish instead of becoming a space.
    assert process_punctuation("3,000 red-white") == "3000 redwhite"
    assert process_punctuation("red-white") == "red white"
    # Each mark is judged on its own: "(" touches a space and is deleted; ")" does not and becomes a space.
    assert process_punctuation("yes (mostly)") == "yes mostly "
    assert process_punctuation("left/right") == "left right"
    assert process_digit_article("The Three Bears") == "3 bears"


def _official_vqa(pred, answers):
    """VQA's evaluate() loop transcribed: each human answer left out in turn, matches among the others / 3."""
    pred = ev.normalize_answer(pred)
    gts = [(i, ev.normalize_answer(a)) for i, a in enumerate(answers)]
    accs = []
    for left_out in gts:
        others = [g for g in gts if g != left_out]
        accs.append(min(1.0, sum(g[1] == pred for g in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matches, expected):
    # 3 matches: leaving out one of the 3 (3 of 10 subsets) leaves 2 -> 2/3; the other 7 subsets keep 3 -> 1.
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert ev.vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_matches_official_loop():
    # TextVQA (m4c): EvalAI's processor on the prediction and on every human answer
    assert ev.vqa_accuracy("dog", ["a dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert ev.vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert ev.vqa_accuracy("no", ["yes"] * 10) == 0.0
    assert ev.vqa_accuracy("two", ["Two"] * 10) == 1.0
    rng = random.Random(0)
    pool = ["2", "two", "dog", "a dog", "yes", "Yes.", "cat"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        pred = rng.choice(pool)
        assert ev.vqa_accuracy(pred, answers) == pytest.approx(_official_vqa(pred, answers))
    with pytest.raises(ValueError):
        ev.vqa_accuracy("x", [])


@pytest.mark.parametrize("pred, answers, acc", [
    ("two", ["2"] * 10, 1.0),               # LLaVA's submission is "2"; unanimous humans compared as released
    ("two", ["two"] * 10, 0.0),             # ... so a unanimous "two" never matches the submitted "2"
    ("Two", ["two"] * 9 + ["2"], 1.0),      # humans disagree: both sides normalised, all ten become "2"
    ("dog", ["a dog"] * 3 + ["cat"] * 7, 0.9),
    ("dog", ["a dog"] * 10, 0.0),           # unanimous "a dog" keeps its article
    (" Yes. ", [" yes"] * 10, 1.0),         # both sides are stripped
    ("red-white", ["red white"] * 4 + ["red"] * 6, 1.0),
])
def test_vqav2_accuracy_as_the_vqa_server(pred, answers, acc):
    assert ev.vqav2_accuracy(pred, answers) == pytest.approx(acc)


def test_gqa_match():
    # LLaVA: text.rstrip('.').lower(); GQA's eval.py: predicted == gold
    assert ev.gqa_match("Yes.", "yes")
    assert ev.gqa_match("Left..", "left")
    assert not ev.gqa_match(" left. ", "left")  # no whitespace strip (LLaVA's answers are stripped when written)
    assert not ev.gqa_match("the left", "left")
    assert not ev.gqa_match("2", "two")  # GQA has no number-word rule


# --- POPE -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No", "no"), ("No, there isn't.", "no"), ("There is no dog in the image.", "no"),
    ("I do not see one", "no"), ("Yes, there is a dog. No cat though.", "yes"),  # only the first sentence counts
    ("NO", "yes"), ("Nope", "yes"), ("no.", "no"),  # only the words 'No', 'not', 'no' mean no
])
def test_pope_parse(text, parsed):
    assert pope_parse(text) == parsed


def test_pope_metrics_hand_computed_confusion_matrix():
    # TP=3, FP=1, TN=4, FN=2
    cases = ([("Yes", "yes")] * 3 + [("Yes, it is.", "no")] + [("No", "no"), ("There is no cat.", "no"),
             ("not at all", "no"), ("No.", "no")] + [("No", "yes"), ("I can not tell", "yes")])
    m = ev.pope_metrics([p for p, _ in cases], [g for _, g in cases])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 4, 2)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(0.4)
    assert ev.pope_metrics(["No"], ["no"])["f1"] == 0.0  # no positives: 0 instead of the script's ZeroDivisionError
    with pytest.raises(ValueError):
        ev.pope_metrics(["yes"], [])


# --- MME ------------------------------------------------------------------------------------------------------------


def test_mme_parse():
    assert [mme_parse(t) for t in ("Yes", "no", "Yes, it is.", "No.", "Not really", "I think yes", "maybe")] == [
        "yes", "no", "yes", "no", "no", "other", "other"]


def test_mme_scores_acc_plus():
    recs = [  # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2 -> 125
        ("existence", "e1", "Yes", "Yes"), ("existence", "e1", "No", "No"),
        ("existence", "e2", "Yes", "yes, there is"), ("existence", "e2", "No", "Yes"),
        # count: both images both right -> 200
        ("count", "c1", "Yes", "Yes"), ("count", "c1", "No", "No"), ("count", "c2", "No", "no"),
        ("count", "c2", "Yes", "Yes"),
        # code_reasoning: an unparsable answer counts wrong -> acc 1/2, acc+ 0 -> 50
        ("code_reasoning", "k1", "Yes", "The code prints 3"), ("code_reasoning", "k1", "No", "No"),
    ]
    s = ev.mme_scores({"category": c, "image": i, "answer": a, "prediction": p} for c, i, a, p in recs)
    assert s["existence/acc"] == 0.75 and s["existence/acc_plus"] == 0.5
    assert s["existence"] == pytest.approx(125)
    assert s["count"] == pytest.approx(200)
    assert s["code_reasoning"] == pytest.approx(50)
    assert s["perception"] == pytest.approx(325) and s["cognition"] == pytest.approx(50)
    with pytest.raises(ValueError, match="does not have its two questions"):
        ev.mme_scores([{"category": "count", "image": "x", "answer": "yes", "prediction": "yes"}])
    with pytest.raises(ValueError, match="unknown MME subtask"):
        ev.mme_scores([{"category": "poetry", "image": "x", "answer": "yes", "prediction": "yes"}])


def test_mme_scores_refuse_what_calculation_py_cannot_read():
    def rec(image, pred, answer="Yes"):
        return {"category": "count", "image": image, "answer": answer, "prediction": pred}

    # calculation.py splits each result line on tabs into four fields, and reads two consecutive lines per image
    with pytest.raises(ValueError, match="'c1'.*tab or line break"):
        ev.mme_scores([rec("c1", "Yes\nNo"), rec("c1", "No")])
    with pytest.raises(ValueError, match="'c1' does not have its two questions next to each other"):
        ev.mme_scores([rec("c1", "Yes"), rec("c2", "Yes"), rec("c1", "No"), rec("c2", "No")])
    # its parser reads the prediction with the line's "\n": the same label as the bare text, e.g. "no" in "no\n"
    s = ev.mme_scores([rec("c1", "no", "no"), rec("c1", "Nah", "no")])
    assert s["count/acc"] == 0.5 and s["count/acc_plus"] == 0.0


# --- multiple choice ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, n, letter", [
    ("A", 4, "A"), ("B. cat", 4, "B"), ("The answer is C.", 4, "C"), ("E", 5, "E"),
    ("B\na song", 4, None),               # the example: not a letter, no "X. ", no "The answer is"
    ("A\nThe answer is B.", 4, "B"),       # the example: the "The answer is" search wins
    ("The answer is B", 4, None),          # their pattern needs one more character after the letter
    ("The answer is B\n", 4, None),        # ... and '.' does not match a newline
    ("The answer is BC", 4, "B"),
    ("The answer is A. The answer is B.", 4, None),  # two matches: FAILED
    ("The answer is C.", 2, None),          # a letter past the choices scores wrong
    ("E", 4, None), ("F", 6, None),         # options are A-E only
    ("(B)", 4, None), ("B.", 4, None), ("b", 4, None), ("AB", 4, None), ("", 4, None), (" A", 4, None),
])
def test_scienceqa_choice(text, n, letter):
    assert ev.scienceqa_choice(text, n) == letter


def test_seed_right_is_the_letter_itself():
    assert ev.seed_right("A", "A")
    for text in ("A. One", "The answer is A.", "A.", "(A)", "a"):
        assert not ev.seed_right(text, "A")


CHOICES = ["dog", "cat", "red bird", "fish"]


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("(B)", "B"), ("B.", "B"), ("Answer: C", "C"), ("I choose A", "A"),  # a lone A is a letter
    ("A is the answer", "A"),
    ("A cat sits on the red bird here today", None),  # A is not among the last four words; text too long
    ("A cat", "A"),
    ("B or C", None), ("E", None), ("", None),
    ("Cannot determine the answer from the image.", "Z"), ("Z", "Z"),   # refusals: read, and always wrong
    ("The correct answer is **B** because the cat is red.", "B"),      # B too early; their verbose pattern finds it
    ("the answer is a", "A"),                 # that pattern ignores case
    ("cat", "B"), ("Red bird.", "C"), ("It is a red bird", "C"), ("dog and cat", None),
    ("Failed to obtain answer via API", None),
])
def test_mmbench_choice(text, letter):
    assert ev.mmbench_choice(text, CHOICES) == letter


def test_lenient_choice_is_opt_in_and_labelled(tmp_path):
    assert ev.lenient_choice("B\na song", CHOICES) == "B"           # newlines read as ". "
    assert ev.lenient_choice("I think (C).", CHOICES) == "C"
    assert ev.lenient_choice("Cannot determine the answer", CHOICES) is None
    qs = _jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "x.png", "text": "Q?\nA. a\nB. b"}])
    items = ev.read_seed(qs, tmp_path)
    items = [dataclasses.replace(items[0], answers=("B",))]
    assert ev.score("seed", ["B. b"], items) == {"accuracy": 0.0}
    assert ev.score("seed", ["B. b"], items, lenient=True) == {"accuracy": 0.0, "lenient/accuracy": 1.0}


def test_mmbench_circular():
    # groups 1, 2: main item + copies; group 3: only a copy (not counted, as VLMEvalKit's main-row loop)
    right, groups = [True, True, True, False, True], [1, 1, 2, 2, 3]
    assert ev.mmbench_circular(right, groups, [True, False, True, False, False]) == [(1, True), (2, False)]


# --- image metrics --------------------------------------------------------------------------------------------------


def test_clip_and_dino_score():
    e = np.eye(4)
    assert ev.clip_score(e, 3 * e) == pytest.approx(100)  # cosine: scale-free
    assert ev.clip_score(e, np.roll(e, 1, 0)) == pytest.approx(0)
    # pairs with cos 1 and -0.5: torchmetrics clamps the mean (25), not each pair (which would give 50)
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    txt = np.array([[2.0, 0.0], [-0.5, np.sqrt(0.75)]])
    assert ev.clip_score(img, txt) == pytest.approx(25)
    assert ev.clip_score(img, -txt) == 0.0
    assert ev.dino_score(img, txt) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        ev.clip_score(np.ones((2, 3)), np.ones((3, 3)))


def test_fid_against_sqrtm_and_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    # pytorch-fid's formula with scipy's general matrix square root
    mu_a, s_a, mu_b, s_b = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ref = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    assert ev.fid(a, b) == pytest.approx(ref, rel=1e-8)
    assert ev.fid(a, a) == pytest.approx(0, abs=1e-9)
    # diagonal Gaussians: |Δμ|² + Σ (√σa - √σb)²
    assert ev.frechet_distance([0, 0], np.diag([4.0, 1.0]), [3, 0], np.diag([1.0, 9.0])) == pytest.approx(9 + 1 + 4)
    # fewer samples than dimensions: singular covariances stay finite and non-negative, and fid's sample-space
    # route equals the covariance one
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(7, 16)) + 1
    small = ev.fid(a, b)
    assert np.isfinite(small) and small >= 0
    # (the covariance route takes square roots of rounding-level eigenvalues of the singular Σ: ~1e-9 off)
    assert small == pytest.approx(ev.frechet_distance(*ev.gaussian_stats(a), *ev.gaussian_stats(b)), rel=1e-8)
    assert ev.fid(a, a) == pytest.approx(0, abs=1e-12)


# --- readers --------------------------------------------------------------------------------------------------------


def _png(path=None, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


POST = "\nAnswer the question using a single word or phrase."


def test_vqav2_reader_score_and_answer_files(tmp_path):
    _png(tmp_path / "val2014/COCO_val2014_000000000042.jpg")
    qs = _jsonl(tmp_path / "llava_vqav2_mscoco_val2014.jsonl", [
        {"question_id": 420, "image": "COCO_val2014_000000000042.jpg", "text": "How many dogs?" + POST,
         "category": "default"},
        {"question_id": 421, "image": "COCO_val2014_000000000042.jpg", "text": "Is it red?" + POST,
         "category": "default"}])
    ann = tmp_path / "v2_mscoco_val2014_annotations.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 420, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 3 + ["3"] * 7)]},
        {"question_id": 421, "answer_type": "yes/no", "question_type": "is it",
         "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)]}]}))
    items = ev.read_benchmark("vqav2", qs, tmp_path / "val2014", ann)
    assert [it.key for it in items] == ["420", "421"] and items[0].answers[:3] == ("2", "2", "2")
    assert items[0].prompt.startswith("How many dogs?") and items[0].load_image().size == (4, 4)
    assert items[0].source.endswith("llava_vqav2_mscoco_val2014.jsonl:1")
    m = ev.score("vqav2", ["Two.", "Yes"], items)
    assert m == pytest.approx({"accuracy": 0.95, "accuracy/number": 0.9, "accuracy/yes/no": 1.0})
    # LLaVA answer JSONL out and back in, by key
    path = tmp_path / "answers/merge.jsonl"
    ev.write_answers(path, [ev.answer_record(it, t, "genllava-test") for it, t in zip(items, ["Two.", "Yes"])])
    recs = ev.read_answers(path)
    assert set(recs[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert recs[0]["question_id"] == 420 and recs[0]["model_id"] == "genllava-test"
    assert recs[0]["answer_id"] == ev.answer_record(items[0], "Two.", "genllava-test")["answer_id"]  # reproducible
    assert ev.score("vqav2", ev.align_answers(recs[::-1], items), items) == m
    assert ev.score("vqav2", {"420": "2", "421": "no"}, items)["accuracy"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="no prediction"):
        ev.score("vqav2", {"420": "2"}, items)
    with pytest.raises(ValueError, match="no answer"):
        ev.align_answers(recs[:1], items)
    # a test split (no annotations) reads, but cannot be scored
    test_items = ev.read_vqav2(qs, tmp_path / "val2014")
    with pytest.raises(ValueError, match="no reference answer"):
        ev.score("vqav2", ["2", "yes"], test_items)


def test_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "hi"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2: not valid JSON"):
        ev.read_gqa(bad, tmp_path)
    bad.write_text(json.dumps({"question_id": 1, "text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1: missing key\(s\) \['image'\]"):
        ev.read_gqa(bad, tmp_path)
    bad.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "hi"}) + "\n")
    answers = tmp_path / "testdev_balanced_questions.json"
    answers.write_text(json.dumps({"2": {"answer": "no"}}))
    with pytest.raises(ValueError, match=r"q\.jsonl:1: question_id 1 has no answer"):
        ev.read_gqa(bad, tmp_path, answers)
    with pytest.raises(FileNotFoundError, match=r"q\.jsonl:1: image .*a\.jpg not found"):
        ev.read_gqa(bad, tmp_path)[0].load_image()
    with pytest.raises(ValueError, match="unknown benchmark"):
        ev.score("vqa3", [], [])


def test_gqa_reader_and_score(tmp_path):
    qs = _jsonl(tmp_path / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?" + POST, "category": "default"},
        {"question_id": "201640614", "image": "n235859.jpg", "text": "Which side is the cup on?" + POST}])
    answers = tmp_path / "testdev_balanced_questions.json"
    answers.write_text(json.dumps({"201307251": {"answer": "no", "imageId": "n161313"},
                                   "201640614": {"answer": "left", "imageId": "n235859"}}))
    items = ev.read_benchmark("gqa", qs, tmp_path / "images", answers)
    assert ev.score("gqa", ["No.", "The left"], items) == {"accuracy": 0.5}


def test_textvqa_reader_repeated_ids(tmp_path):
    # LLaVA's TextVQA question_id is the image id: two questions on one image share it.
    qs = _jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": "what is the brand of this camera?\nReference OCR token: dakota, digital" + POST},
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": "What year is it?" + POST}])
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [
        {"image_id": "003a8ae2ef43b901", "question": "what year is it?", "question_id": 34603,
         "answers": ["1999"] * 10},
        {"image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?", "question_id": 34602,
         "answers": ["dakota"] * 7 + ["clos culombu"] * 3}]}))
    items = ev.read_benchmark("textvqa", qs, tmp_path / "train_images", ann)
    assert [it.key for it in items] == ["003a8ae2ef43b901", "003a8ae2ef43b901#1"]
    assert items[0].answers[0] == "dakota" and items[1].answers[0] == "1999"
    recs = [ev.answer_record(it, t, "m") for it, t in zip(items, ["Dakota", "1999."])]
    assert ev.score("textvqa", ev.align_answers(recs, items), items) == {"accuracy": 1.0}
    assert ev.score("textvqa", ["clos culombu", "2000"], items)["accuracy"] == pytest.approx(0.45)


def test_pope_reader_pairs_labels_in_order(tmp_path):
    questions = [("adversarial", "Is there a dog in the image?"), ("adversarial", "Is there a cat in the image?"),
                 ("random", "Is there a car in the image?"), ("random", "Is there a tree in the image?")]
    labels = {"adversarial": ["yes", "no"], "random": ["yes", "yes"]}
    qs = _jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": i, "image": "COCO_val2014_000000310196.jpg", "text": t + POST, "category": c}
        for i, (c, t) in enumerate(questions)])
    for cat, labs in labels.items():
        texts = [t for c, t in questions if c == cat]
        _jsonl(tmp_path / f"pope/coco_pope_{cat}.json", [
            {"question_id": i + 1, "image": "COCO_val2014_000000310196.jpg", "text": t, "label": lab}
            for i, (t, lab) in enumerate(zip(texts, labs))])
    items = ev.read_benchmark("pope", qs, tmp_path / "val2014", tmp_path / "pope")
    assert [it.answers[0] for it in items] == ["yes", "no", "yes", "yes"]
    m = ev.score("pope", ["Yes", "Yes, there is.", "Yes", "No"], items)
    assert m["adversarial/accuracy"] == 0.5 and m["adversarial/precision"] == 0.5 and m["adversarial/recall"] == 1
    assert m["random/recall"] == 0.5 and m["random/precision"] == 1.0
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3) / 2) and m["yes_ratio"] == pytest.approx((1.0 + 0.5) / 2)
    # a question file whose order does not match the labels fails, naming both lines
    _jsonl(tmp_path / "pope/coco_pope_random.json", [
        {"question_id": 1, "text": "Is there a tree in the image?", "label": "yes"},
        {"question_id": 2, "text": "Is there a car in the image?", "label": "yes"}])
    with pytest.raises(ValueError, match=r"llava_pope_test\.jsonl:3: .*coco_pope_random\.json:1"):
        ev.read_pope(qs, tmp_path / "val2014", tmp_path / "pope")


def test_mme_reader_and_score(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # a flat subtask folder (images and .txt side by side) and one with images/ + questions_answers_YN/
    _png(root / "existence/000000006040.jpg")
    (root / "existence/000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    _png(root / "code_reasoning/images/0020.png")
    (root / "code_reasoning/questions_answers_YN").mkdir(parents=True)
    (root / "code_reasoning/questions_answers_YN/0020.txt").write_text(
        "The image shows a python code. Is the output of the code '3'?  Please answer yes or no.\tNo\n"
        "The image shows a python code. Is the output of the code '5'?  Please answer yes or no.\tYes\n")
    qs = _jsonl(tmp_path / "llava_mme.jsonl", [
        {"question_id": "existence/000000006040.jpg", "image": "existence/000000006040.jpg", "category": "existence",
         "text": "Is there a train in this image? Please answer yes or no." + POST},
        {"question_id": "existence/000000006040.jpg", "image": "existence/000000006040.jpg", "category": "existence",
         "text": "Is there a bed in this image? Please answer yes or no." + POST},
        {"question_id": "code_reasoning/0020.png", "image": "code_reasoning/images/0020.png",
         "category": "code_reasoning", "text": "The image shows a python code. Is the output of the code '3'?"},
        {"question_id": "code_reasoning/0020.png", "image": "code_reasoning/images/0020.png",
         "category": "code_reasoning", "text": "The image shows a python code. Is the output of the code '5'?"}])
    items = ev.read_benchmark("mme", qs, root)
    assert [it.answers[0] for it in items] == ["Yes", "No", "No", "Yes"]
    assert items[2].load_image().size == (4, 4)
    m = ev.score("mme", ["Yes", "No", "No", "No"], items)
    assert m["existence"] == 200 and m["code_reasoning"] == 50
    assert m["perception"] == 200 and m["cognition"] == 50
    (root / "existence/000000006040.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match=r"000000006040\.txt:1: expected 'question<TAB>answer'"):
        ev.read_mme(qs, root)


def test_scienceqa_reader_and_img_accuracy(tmp_path):
    qs = tmp_path / "llava_test_CQM-A.json"
    qs.write_text(json.dumps([
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: N/A\nQuestion: Which animal barks?\nOptions: (A) cat "
                                       "(B) dog"}, {"from": "gpt", "value": "B"}]},
        {"id": "7", "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which is a fruit?\nOptions: (A) apple (B) rock "
                                       "(C) sand"}, {"from": "gpt", "value": "A"}]}]))
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({"4": {"choices": ["cat", "dog"], "answer": 1, "image": "image.png"},
                                    "7": {"choices": ["apple", "rock", "sand"], "answer": 0, "image": None}}))
    items = ev.read_benchmark("scienceqa", qs, tmp_path / "test", problems)
    assert items[0].prompt.startswith("Context: N/A") and items[0].prompt.endswith(
        "Answer with the option's letter from the given choices directly.")
    assert items[0].answers == ("B",) and items[1].image is None and items[1].load_image() is None
    assert ev.score("scienceqa", ["B", "A"], items) == {"accuracy": 1.0, "img_accuracy": 1.0}
    # LLaVA's strict rules: "(B)" is not an answer it accepts
    assert ev.score("scienceqa", ["(B)", "The answer is A."], items) == {"accuracy": 0.5, "img_accuracy": 0.0}
    # the answer file keeps "<image>" where model_vqa_science.py writes it: eval_science_qa.py finds IMG by it
    recs = [ev.answer_record(it, "B", "m") for it in items]
    assert recs[0]["prompt"] == "<image>\n" + items[0].prompt and "<image>" not in recs[1]["prompt"]
    # without problems.json the choices come from the prompt
    assert ev.read_scienceqa(qs, tmp_path / "test")[1].meta["choices"] == ["apple", "rock", "sand"]


def _mmbench_tsv(path, rows):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(c, "") for c in cols])
    return path


def test_mmbench_reader_rounds_and_circular(tmp_path):
    img = base64.b64encode(_png(color=(0, 255, 0))).decode()
    tsv = _mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv", [
        {"index": 0, "question": "What colour is the image?", "A": "red", "B": "green", "C": "blue",
         "answer": "B", "category": "attribute", "image": img},
        # its circular copy, as the official TSVs store them (index + 1e6, options rotated); image shared by index
        {"index": 1000000, "question": "What colour is the image?", "A": "green", "B": "blue", "C": "red",
         "answer": "A", "category": "attribute", "image": "0"},
        {"index": 1, "question": "Which is larger?", "hint": "Compare the two.", "A": "1", "B": "2",
         "answer": "B", "category": "math", "image": img}])
    items = ev.read_benchmark("mmbench", tsv)
    assert items[0].prompt == ("What colour is the image?\nA. red\nB. green\nC. blue\n"
                               "Answer with the option's letter from the given choices directly.")
    assert items[2].prompt.startswith("Compare the two.\nWhich is larger?\nA. 1\nB. 2")
    assert items[1].load_image().getpixel((0, 0)) == (0, 255, 0)
    assert [it.meta["group"] for it in items] == [0, 0, 1]
    assert [it.meta["main"] for it in items] == [True, False, True]
    m = ev.score("mmbench", ["B", "blue", "(B)"], items)  # second pass of question 0 wrong
    assert m == pytest.approx({"accuracy": 2 / 3, "circular_accuracy": 0.5, "category/attribute": 0.0,
                               "category/math": 1.0})
    # LLaVA's --all-rounds rotations: round r shifts the options by r and the answer letter with them
    rounds = ev.read_mmbench(tsv, all_rounds=True)
    first = [it for it in rounds if it.question_id == 0]
    assert [it.key for it in first] == ["0", "0@1", "0@2"]
    assert [it.meta["choices"] for it in first] == [["red", "green", "blue"], ["green", "blue", "red"],
                                                   ["blue", "red", "green"]]
    assert [it.answers[0] for it in first] == ["B", "A", "C"]
    recs = [ev.answer_record(it, it.answers[0], "m") for it in rounds]
    assert recs[1]["round_id"] == 1
    assert ev.score("mmbench", ev.align_answers(recs, rounds), rounds)["circular_accuracy"] == 1.0
    bad = _mmbench_tsv(tmp_path / "bad.tsv", [{"index": 5, "question": "q", "A": "x", "B": "y", "answer": "C"}])
    with pytest.raises(ValueError, match=r"bad\.tsv:2: answer 'C' is not one of the 2 option letters"):
        ev.read_mmbench(bad)


def test_seed_reader_and_score(tmp_path):
    text = "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n" \
           "Answer with the option's letter from the given choices directly."
    qs = _jsonl(tmp_path / "llava-seed-bench.jsonl", [
        {"question_id": "101669", "image": "SEED-Bench-image/1454426_2591111986.jpg", "text": text,
         "category": "Instances Counting"},
        {"question_id": "v1", "image": "SEED-Bench-video-image/v1.png", "text": text, "category": "Action"}])
    ann = tmp_path / "SEED-Bench.json"
    ann.write_text(json.dumps({"question_type": {"Instances Counting": 5, "Action Recognition": 10}, "questions": [
        {"question_id": "101669", "answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three",
         "choice_d": "Four", "question_type_id": 5, "data_type": "image"},
        {"question_id": "v1", "answer": "C", "choice_a": "run", "choice_b": "sit", "choice_c": "jump",
         "choice_d": "swim", "question_type_id": 10, "data_type": "video"}]}))
    items = ev.read_benchmark("seed", qs, tmp_path, ann)
    assert items[1].meta["choices"] == ["run", "sit", "jump", "swim"]
    m = ev.score("seed", ["A", "B"], items)
    assert m == {"accuracy": 0.5, "image_accuracy": 1.0, "video_accuracy": 0.0,
                 "accuracy/Instances Counting": 1.0, "accuracy/Action Recognition": 0.0}
    assert ev.read_seed(qs, tmp_path)[0].meta["choices"] == ["One", "Two", "Three", "Four"]  # from the prompt
