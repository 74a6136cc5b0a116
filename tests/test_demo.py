"""The demo's held-out scoring (genllava_jax/demo.py) on records of the synthetic world."""

import random

import pytest

from genllava_jax import demo
from genllava_jax.data import synthetic


def test_understanding_is_broken_down_by_question():
    rng = random.Random(0)
    scenes = [synthetic.Scene(c, k, "small", "left", "grey") for c in synthetic.COLOURS for k in synthetic.KINDS]
    rows = [synthetic.i2t_record(rng, s, 0) for s in scenes * 4]
    # a model that knows colours but answers every other question "circle"
    answers = [r["conversations"][1]["value"] if "colour is the shape" in r["conversations"][0]["value"] else "circle"
               for r in rows]
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in rows]
    acc = demo.by_question(questions, [a == r["conversations"][1]["value"] for r, a in zip(rows, answers)])
    asked = {r["conversations"][0]["value"].split("\n")[-1] for r in rows}
    assert set(acc) == asked and len(asked) >= 4
    assert acc["What colour is the shape?"] == 1.0
    circles = [r for r in rows if r["conversations"][0]["value"].endswith("What shape is it?")]
    assert acc["What shape is it?"] == pytest.approx(
        sum(r["conversations"][1]["value"] == "circle" for r in circles) / len(circles))
    assert acc["Where is the shape?"] == 0.0
