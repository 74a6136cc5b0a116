"""Generation and editing in the sweep: two tiny checkpoints x {pope (text), t2i, edit} x {the model's own [SOI],
forced [SOI]}, with small random CLIP and DINO encoders: a killed sweep resumes to the same results and images,
and each text bucket and each image bucket compiles once."""

import json

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from genllava_jax import evaluate as ev, infer, sweep
from genllava_jax.evaluate import generation, synthetic
from micro import fast_compile, micro_config
from test_sweep import untrained_workdir

SETTINGS = {"own": infer.Settings(max_new_tokens=4, num_steps=2),
            "forced": infer.Settings(max_new_tokens=4, num_steps=2, force_image=True)}
BATCH = 8


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """{clip, dino} folders: a CLIPModel with its tokenizer and a ViTModel, small and random."""
    out = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=96, eos_token_id=97,
                         pad_token_id=97),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8))
    clip.save_pretrained(out / "clip")
    vocab = {"<|startoftext|>": 96, "<|endoftext|>": 97, "!": 0, "a</w>": 3, "b</w>": 4, "c</w>": 5}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=16,
                  pad_token="<|endoftext|>").save_pretrained(str(out / "clip"))
    ViTModel(ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       image_size=16, patch_size=8)).save_pretrained(out / "dino")
    return {"clip": str(out / "clip"), "dino": str(out / "dino"), "clip_fid": True}


@pytest.fixture(scope="module")
def workdirs(data_dir, tmp_path_factory):
    out = []
    for seed in (0, 1):
        c = micro_config(data_dir)
        c.seed = seed
        out.append(str(untrained_workdir(c, tmp_path_factory.mktemp(f"run{seed}"))))
    return out


@pytest.fixture(scope="module")
def benchmarks(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return [sweep.Benchmark("pope", synthetic.write_pope(data_dir, out, 8, eval_only=False)),
            sweep.Benchmark("t2i", synthetic.write_t2i(data_dir, out, 8, eval_only=False)),
            sweep.Benchmark("edit", synthetic.write_edit(data_dir, out, 8, eval_only=False))]


def _run(workdirs, benchmarks, encoders, out):
    return sweep.run(workdirs, benchmarks, SETTINGS, out, batch_size=BATCH, length_buckets=(32, 64, 128),
                     encoders=encoders)


@pytest.fixture(scope="module")
def through(workdirs, benchmarks, encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("through")
    infer.decode_arrays.clear_cache()
    infer._images.clear_cache()
    summary = _run(workdirs, benchmarks, encoders, out)
    return out, summary, infer.decode_arrays._cache_size(), infer._images._cache_size()


def _files(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted((out / "cells").rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_generation_cells_metrics_and_compiles(through, workdirs):
    out, summary, text_compiles, image_compiles = through
    assert summary.cells_run == 2 * 2 * 3
    assert text_compiles == len({s[1:] for s in summary.shapes})  # one per (bucket, tokens, temperature, top_p)
    assert image_compiles == len({s[1:] for s in summary.image_shapes}) >= 1  # one per image prompt bucket
    rows = {(r["checkpoint"], r["setting"]): r for r in sweep.write_results(out)}
    assert len(rows) == 4
    for (ckpt, setting), r in rows.items():
        if setting == "forced":  # every answer got an image, labelled forced/
            assert float(r["t2i/forced/images"]) == 8 and float(r["edit/forced/images"]) == 8
            for m in ("t2i/forced/clip_score", "t2i/forced/clip_fid", "edit/forced/l1", "edit/forced/l2",
                      "edit/forced/clip_i", "edit/forced/dino", "edit/forced/clip_t"):
                assert np.isfinite(float(r[m])), m
        assert 0 <= float(r["t2i/soi_rate"]) <= 1 and int(r["pope/n"]) == 8
    md = (out / "results.md").read_text()
    assert "t2i forced/clip_score" in md and "edit forced/dino" in md and "| forced |" in md
    cell = out / "cells" / sweep.Checkpoint(workdirs[0], 0).dirname / "forced"
    recs = [json.loads(line) for line in (cell / "edit.jsonl").read_text().splitlines()]
    assert all((cell / "edit_images" / r["metadata"]["image"]).exists() for r in recs)
    assert (cell / "edit_samples.png").exists() and (cell / "t2i_samples.png").exists()


@pytest.mark.slow
def test_killed_generation_sweep_resumes_to_the_same_results(through, workdirs, benchmarks, encoders, tmp_path,
                                                            monkeypatch):
    ref, _, text_compiles, image_compiles = through
    written, real = [], sweep.write_answers

    def dies(path, records, append=False):
        real(path, records, append)
        if append and "_images" not in str(path):
            written.append(len(records))
            if len(written) == 5:  # in the 5th cell (the first checkpoint's forced t2i), before it is finished
                raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "write_answers", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(workdirs, benchmarks, encoders, tmp_path)
    monkeypatch.setattr(sweep, "write_answers", real)
    summary = _run(workdirs, benchmarks, encoders, tmp_path)
    assert summary.cells_skipped == 4 and summary.cells_run == 8
    assert _files(tmp_path) == _files(ref)  # answers, images, grids, done.json: the same bytes
    for name in ("results.md", "results.csv"):
        assert (tmp_path / name).read_text() == (ref / name).read_text()
    assert infer.decode_arrays._cache_size() == text_compiles and infer._images._cache_size() == image_compiles


def test_readers_and_edit_metrics(tmp_path):
    from PIL import Image

    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 1, "caption": " A red cat. "}]}))
    items = generation.read_t2i(coco, template="Draw {}")
    assert items[0].prompt == "Draw A red cat." and items[0].meta["caption"] == "A red cat."
    for i, c in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 6), c).save(tmp_path / f"{i}.png")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"source_img": "0.png", "instruction": "Make it blue.", "target_img": "1.png"}) + "\n")
    items = generation.read_edit(edits, tmp_path)
    assert items[0].image == str(tmp_path / "0.png") and items[0].meta["caption"] is None
    blue = np.zeros((4, 4, 3), np.uint8)
    blue[..., 2] = 255
    # MagicBrush: the 4x4 generation resized to the target's 8x6, pixels in [0, 1]: an exact match
    m = generation.edit_metrics(items, {items[0].key: blue}, {items[0].key: True}, generation.Encoders())
    assert m == {"soi_rate": 1.0, "images": 1.0, "l1": 0.0, "l2": 0.0}
    m = generation.edit_metrics(items, {items[0].key: blue[..., ::-1].copy()}, {items[0].key: False},
                                generation.Encoders())
    assert m["soi_rate"] == 0 and m["l1"] == pytest.approx(2 / 3) and m["l2"] == pytest.approx(2 / 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "0.png", "target": "1.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: none of the keys \['instruction'\]"):
        generation.read_edit(bad, tmp_path)
    assert ev.fid  # the metrics module is shared with evaluate
