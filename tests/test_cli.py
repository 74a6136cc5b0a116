"""genllava-chat / -generate / -edit on a checkpoint directory of a (two-step) trained micro model."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genllava_jax import cli, infer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir


def test_chat_streams_the_answer_and_keeps_the_conversation(workdir, data_dir, capsys):
    assistant, c = cli.load_assistant(workdir)
    image = cli.open_image(next((data_dir / "images").iterdir()))
    settings = infer.Settings(max_new_tokens=5, num_steps=2)
    capsys.readouterr()
    replies = cli.chat(assistant, image, ["What colour is the shape?", "And its kind?"], settings)
    printed = capsys.readouterr().out.splitlines()
    assert [p.strip() for p in printed[:2]] == [r.text for r in replies]  # streamed text = the final answers
    # the second turn's prompt holds the first question (with the image) and answer
    first = assistant.prompt([], "What colour is the shape?", task="i2t", has_image=True)
    second = assistant.prompt([("<image>\nWhat colour is the shape?", replies[0].text)], "And its kind?",
                              task="i2t", has_image=True)
    assert second[:len(first)] == first and len(second) > len(first) + len(replies[0].tokens)


def test_generate_and_edit_write_pngs(workdir, data_dir, tmp_path):
    assistant, c = cli.load_assistant(workdir)
    settings = infer.Settings(max_new_tokens=4, num_steps=2)
    out = cli.draw(assistant, "Draw a red circle.", None, settings, tmp_path / "gen.png")
    size = c.data.target_image_size
    assert np.asarray(Image.open(out)).shape == (size, size, 3)
    src = cli.open_image(next((data_dir / "images").iterdir()))
    out = cli.draw(assistant, "Make it blue.", src, settings, tmp_path / "edit.png")
    assert np.asarray(Image.open(out)).shape == (size, size, 3)


def test_generate_command_line(workdir, tmp_path):
    exe = Path(sys.executable).parent / "genllava-generate"
    out = tmp_path / "cli.png"
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run([str(exe), f"--workdir={workdir}", "--prompt=Draw a red circle.", f"--out={out}",
                           "--steps=2", "--max_new_tokens=3"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(str(out)) and out.exists()
    bad = subprocess.run([str(exe), f"--workdir={tmp_path / 'nope'}", "--prompt=x"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode != 0 and "no config.json" in bad.stderr


def test_datagen_demo_on_a_trained_model(workdir, tmp_path):
    """`make datagen-demo`'s script, at 2 scenes and 2 topics on the (two-step) micro model."""
    import json

    from genllava_jax import errors
    from genllava_jax.datagen import demo

    with pytest.raises(errors.MissingFile, match="make demo"):
        demo.run(tmp_path / "x", tmp_path / "nope")
    out = tmp_path / "datagen"
    r = demo.run(out, workdir, num_scenes=2, num_topics=2, steps=2, num_reply_topics=0)
    assert json.loads((out / "report.json").read_text()) == r
    assert [r[k]["total"] for k in ("llava", "stablellava", "stablellava_reply")] == [6, 2, 0]  # 2 scenes x 3 asks
    for name in ("llava", "stablellava"):  # what it kept, the training pipeline reads with no skips
        assert r["read_back"][f"{name}.jsonl"]["rows"] == r[name]["kept"], r
        assert r["read_back"][f"{name}.jsonl"]["skipped"] == {}, r
        lines = (out / f"{name}.jsonl").read_text().splitlines() if r[name]["kept"] else []
        rejected = (out / f"{name}.rejected.jsonl").read_text().splitlines() if r[name]["filtered"] else []
        assert len(lines) + len(rejected) == r[name]["total"]
    # every image prompt the LLM wrote was rendered and judged (or filtered before rendering)
    assert r["judge"]["rendered"] <= 2 and r["judge"]["colour_right"] <= r["judge"]["colour_named"]
