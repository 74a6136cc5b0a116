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


@pytest.mark.slow
def test_sigterm_during_training_stops_without_scores_and_says_how_to_resume(tmp_path):
    """`make demo` preempted in training: no evaluation of a half-trained model, no "trained N steps"; the printed
    command resumes from the checkpoint (data and VAE reused) and finishes."""
    import os
    import re
    import shlex
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from micro import FAST_COMPILE

    root = Path(__file__).resolve().parent.parent
    args = [f"--workdir={tmp_path / 'demo'}", "--num_train=300", "--num_eval=4", "--variants=1", "--vae_steps=3",
            "--vae_batch=8", "--train_steps=40", "--sample_steps=2"]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genllava_jax.demo", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr, started = [], threading.Event()

    def read_progress():  # tqdm's bar: "train: ... 3/40": the loop (and its SIGTERM handler) is running
        buf = ""
        while chunk := proc.stderr.read(64):
            buf = (buf + chunk)[-4000:]
            stderr.append(chunk)
            if re.search(r"train:.*\b[1-9]\d*/40\b", buf):
                started.set()

    threading.Thread(target=read_progress, daemon=True).start()
    assert started.wait(1500), "".join(stderr)[-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(600) == 1, out + "".join(stderr)[-3000:]
    m = re.search(r"\[3/5\] training stopped \(SIGTERM\) after step (\d+) of 40; .* Nothing was evaluated\. "
                  r"Resume with: (\S+ -m genllava_jax\.demo .*--resume)$", out, re.M)
    assert m, out
    assert "trained 40 steps" not in out and "[4/5]" not in out and not (tmp_path / "demo" / "metrics.json").exists()
    stopped = int(m.group(1))
    assert 1 <= stopped < 40 and (tmp_path / "demo" / "train" / "checkpoints" / str(stopped)).is_dir()

    again = shlex.split(m.group(2))
    assert again[0] == sys.executable and again[1:3] == ["-m", "genllava_jax.demo"]
    assert again[3:] == args + ["--resume"]
    out = subprocess.run(again, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "(reused)" in out.stdout and "VAE fitted" in out.stdout and f"resumed from step {stopped} " in out.stdout
    assert "[3/5] trained 40 steps" in out.stdout and "[4/5] held-out evaluation" in out.stdout
    _check_sweep_metrics(tmp_path / "demo", out.stdout)


def _check_sweep_metrics(work, stdout):
    """The finished demo's generation and editing came through the sweep: its metrics are in metrics.json and sane,
    and the judge's accuracies are those of the images the sweep saved."""
    import json

    import numpy as np

    m = json.loads((work / "metrics.json").read_text())
    assert "left out as the sweep leaves them out" in stdout and "generation_soi_rate" in stdout
    results = (work / "sweep" / "results.md").read_text()
    assert "| own |" in results and "| forced |" in results
    for task, name, key in (("t2i", "generation", "scene"), ("edit", "editing", "target")):
        recs = [json.loads(line) for line in (work / "sweep" / f"{task}.jsonl").read_text().splitlines()]
        assert recs, f"no held-out {task} records"
        assert 0 <= m[f"{name}_soi_rate"] <= 1 and f"forced/{name}_soi_rate" not in m
        assert m[f"{name}_images"] == round(m[f"{name}_soi_rate"] * len(recs))
        assert m[f"forced/{name}_images"] == len(recs)  # forced: every answer gets its image
        want = {}
        for line in (work / "data" / "eval.jsonl").read_text().splitlines():
            r = json.loads(line)
            want[r["id"]] = (r["meta"][key]["colour"], r["meta"][key]["kind"]) if r["task"] == task else None
        for setting, prefix in (("own", ""), ("forced", "forced/")):
            cell = next((work / "sweep" / "cells").glob(f"*/{setting}"))
            answers = [json.loads(line) for line in (cell / f"{task}.jsonl").read_text().splitlines()]
            assert [a["question_id"] for a in answers] == [r["id"] for r in recs]
            images = [a["metadata"]["image"] for a in answers]  # None: no [SOI], no image, judged wrong
            hits = [f is not None and sweep_judge(cell / f"{task}_images" / f) == want[a["question_id"]]
                    for f, a in zip(images, answers)]
            assert m[f"{prefix}{name}_accuracy"] == pytest.approx(np.mean(hits))
            assert 0 <= m[f"{prefix}{name}_colour_accuracy"] <= 1
    assert m["forced/editing_l1"] > 0 and 0 < m["forced/editing_l2"] <= m["forced/editing_l1"] < 1
    if m["editing_images"]:
        assert m["editing_l1"] > 0 and 0 < m["editing_l2"] <= m["editing_l1"]


def sweep_judge(path):
    """The pixel judge's (colour, kind) of an image the sweep saved."""
    import numpy as np
    from PIL import Image

    return synthetic.judge(np.asarray(Image.open(path).convert("RGB")))
