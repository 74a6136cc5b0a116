"""Data: template labels, <image> expansion, generation tokens, the grain pipeline (order, shards, state, mixture,
bad records), ArrayRecord, and the synthetic world (deterministic, judged exactly)."""

import collections
import json
import shutil
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from PIL import Image

from genllava_jax.constants import IGNORE
from genllava_jax.data import arrayrecord, pipeline, synthetic
from genllava_jax.data.records import BadRecord, parse
from genllava_jax.data.template import encode_conversation, encode_text
from genllava_jax.data.tokenizer import SpecialIds, load_tokenizer

flags.FLAGS.mark_as_parsed()  # grain reads absl flags; train.py parses them through app.run

NUM_PATCHES = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.make_synthetic(tmp_path_factory.mktemp("world"), num_train=400, num_eval=60, seed=0)


@pytest.fixture(scope="module")
def tok(world):
    return load_tokenizer(world["tokenizer"], num_img_tokens=16)


@pytest.fixture(scope="module")
def ids(tok):
    return SpecialIds.of(tok, 16)


def data_cfg(path, **kw):
    cfg = pipeline.default_data_config()
    cfg.update(dict(path=str(path), max_len=64, image_size=32, num_patches=NUM_PATCHES, target_image_size=16,
                    read_threads=1, **kw))
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def rows(batches):
    """Multiset of the real rows (input_ids as tuples) of some batches."""
    return collections.Counter(tuple(b["input_ids"][i]) for b in batches for i in range(len(b["task"]))
                               if b["attention_mask"][i].any())


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- template ------------------------------------------------------------------------------------------------

def test_labels_exactly_on_assistant_tokens(tok, ids):
    turns = [("What shape is it?", "circle"), ("Is the shape small or large?", "a large red circle")]
    input_ids, labels = encode_conversation(tok, ids, turns, task="text", num_patches=NUM_PATCHES)
    inst, end = encode_text(tok, "[INST]"), encode_text(tok, "[/INST]")
    assert len(inst) == len(end) == 1  # special tokens of the synthetic tokenizer
    u1, a1 = encode_text(tok, turns[0][0]), encode_text(tok, turns[0][1])
    u2, a2 = encode_text(tok, turns[1][0]), encode_text(tok, turns[1][1])
    assert len(a1) == 1 and len(a2) == 4
    assert input_ids == [ids.bos, *inst, *u1, *end, *a1, ids.eos, *inst, *u2, *end, *a2, ids.eos]
    # <s> [INST] u1 [/INST] | circle </s> | [INST] u2 [/INST] | a large red circle </s>
    first = 2 + len(u1) + 1
    second = first + 2 + 1 + len(u2) + 1
    expected = [first, first + 1] + list(range(second, second + 5))
    assert np.nonzero(np.asarray(labels) != IGNORE)[0].tolist() == expected
    assert [labels[i] for i in expected] == [input_ids[i] for i in expected]
    assert tok.decode(labels[first:first + 2]) == "circle</s>"
    assert tok.decode(labels[second:second + 5]) == "a large red circle</s>"


def test_image_expands_to_num_patches(tok, ids):
    record = parse({"task": "i2t", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]})
    input_ids, labels = encode_conversation(tok, ids, list(record.turns), task="i2t", num_patches=7)
    at = np.nonzero(np.asarray(input_ids) == ids.image)[0]
    assert at.tolist() == list(range(3, 10))  # <s> [INST] [I2T] then 7 contiguous placeholders
    assert input_ids[2] == ids.i2t and all(labels[i] == IGNORE for i in range(10))
    # LLaVA's convention: an image with no placeholder leads the first user turn; two are refused.
    no_placeholder = parse({"image": "x.png", "conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": "red"}]})
    assert no_placeholder.task == "i2t" and no_placeholder.turns[0][0].startswith("<image>")
    with pytest.raises(BadRecord, match="too_many_images"):
        parse({"image": "x.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                   {"from": "gpt", "value": "red"}]})


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_generation_tokens_end_the_answer_and_are_labelled(tok, ids, task):
    user = "Draw a red circle." if task == "t2i" else "<image>\nMake it green."
    input_ids, labels = encode_conversation(tok, ids, [(user, "Here it is.")], task=task, num_patches=NUM_PATCHES)
    gen = [*ids.generation, ids.eos]
    assert len(ids.generation) == 18 and input_ids[-len(gen):] == gen and labels[-len(gen):] == gen
    assert input_ids[2] == ids.t2i and labels[2] == IGNORE
    answer = encode_text(tok, "Here it is.")
    assert labels[-len(gen) - len(answer):-len(gen)] == answer  # text before [SOI] is labelled too
    assert input_ids.count(ids.image) == (NUM_PATCHES if task == "edit" else 0)


def test_load_tokenizer_adds_missing_tokens(world):
    with pytest.raises(ValueError, match=r"\[IMG16\]"):
        SpecialIds.of(load_tokenizer(world["tokenizer"], num_img_tokens=16), 20)
    tok = load_tokenizer(world["tokenizer"], num_img_tokens=20)
    ids20 = SpecialIds.of(tok, 20)
    assert len(set(ids20.img)) == 20 and tok.convert_ids_to_tokens(list(ids20.img[16:])) == [
        "[IMG16]", "[IMG17]", "[IMG18]", "[IMG19]"]
    assert tok.encode("[IMG17]", add_special_tokens=False) == [ids20.img[17]]


# --- pipeline ------------------------------------------------------------------------------------------------

def test_batch_keys_dtypes_and_shapes(world, tok):
    it, info = pipeline.make_dataset(data_cfg(world["train"]), tok, global_batch=8, seed=0)
    batch = next(it)
    spec = {k: (v.dtype, v.shape) for k, v in batch.items()}
    assert spec == {"input_ids": (np.int32, (8, 64)), "labels": (np.int32, (8, 64)),
                    "attention_mask": (np.int32, (8, 64)), "image": (np.float32, (8, 32, 32, 3)),
                    "has_image": (np.bool_, (8,)), "target_image": (np.float32, (8, 16, 16, 3)),
                    "has_target": (np.bool_, (8,)), "source_image": (np.float32, (8, 16, 16, 3)),
                    "task": (np.int32, (8,))}
    assert info.max_len == 64 and info.batch_size == 8 and info.vocab_size == len(tok)
    for b in take(it, 5):
        t, img = b["task"], (b["input_ids"] == info.special_ids.image).sum(1)
        np.testing.assert_array_equal(b["has_image"], (t == 1) | (t == 3))
        np.testing.assert_array_equal(b["has_target"], (t == 2) | (t == 3))
        np.testing.assert_array_equal(img, np.where(b["has_image"], NUM_PATCHES, 0))
        assert np.abs(b["target_image"]).max() <= 1 and (b["target_image"][~b["has_target"]] == 0).all()
        assert (b["source_image"][t != 3] == 0).all() and all(np.abs(x).max() > 0 for x in b["source_image"][t == 3])


def test_deterministic_for_a_seed(world, tok):
    a = take(pipeline.make_dataset(data_cfg(world["train"]), tok, global_batch=4, seed=3)[0], 4)
    b = take(pipeline.make_dataset(data_cfg(world["train"]), tok, global_batch=4, seed=3)[0], 4)
    c = take(pipeline.make_dataset(data_cfg(world["train"]), tok, global_batch=4, seed=4)[0], 4)
    assert_batches_equal(a, b)
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c))


def test_process_shards_are_disjoint_and_cover(world, tok):
    cfg = data_cfg(world["eval"])
    full = rows(pipeline.make_dataset(cfg, tok, global_batch=8, seed=0, train=False)[0])
    shards = [rows(pipeline.make_dataset(cfg, tok, global_batch=8, seed=0, train=False, process_index=i,
                                         process_count=2)[0]) for i in range(2)]
    assert sum(full.values()) == 60 and shards[0] + shards[1] == full  # every record exactly once
    assert sum(shards[0].values()) == sum(shards[1].values()) == 30
    # train: the first epoch of a shuffled, repeated shard is a permutation of the same shard
    it, info = pipeline.make_dataset(cfg, tok, global_batch=2, seed=0, process_index=1, process_count=2)
    assert info.batch_size == 1 and rows(take(it, 30)) == shards[1]


def test_iterator_state_restores_the_same_batches(world, tok, tmp_path):
    cfg = data_cfg(world["train"])
    it, _ = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    uninterrupted = take(it, 4)

    resumed, _ = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), uninterrupted)
    restored, _ = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_batches_equal(take(restored, 4), uninterrupted)
    mngr.close()


def split_by_task(src, out_dir):
    by_task = collections.defaultdict(list)
    for line in Path(src).read_text().splitlines():
        by_task[json.loads(line)["task"]].append(line)
    for task, lines in by_task.items():
        (out_dir / f"{task}.jsonl").write_text("\n".join(lines) + "\n")


def test_mixture_weights_respected(world, tok):
    split_by_task(world["train"], world["train"].parent)  # next to images/, so the paths still resolve
    base = world["train"].parent
    for path in (f"{base}/i2t.jsonl:3,{base}/text.jsonl:1",
                 [dict(path=f"{base}/i2t.jsonl", weight=1), dict(path=f"{base}/text.jsonl", weight=3)]):
        cfg = data_cfg("")
        with cfg.ignore_type():
            cfg.path = path
        it, info = pipeline.make_dataset(cfg, tok, global_batch=16, seed=0)
        task = np.concatenate([b["task"] for b in take(it, 25)])
        share_i2t = (task == 1).mean()
        assert set(task) == {0, 1} and abs(share_i2t - (0.75 if isinstance(path, str) else 0.25)) < 0.05
        assert len(info.num_records) == 2


def test_bad_records_are_skipped_and_counted(world, tok, tmp_path):
    good = [json.loads(line) for line in Path(world["eval"]).read_text().splitlines()[:5]]
    for r in good:  # their images copied beside the data file: paths must stay inside the data root
        for k in ("image", "target_image"):
            if k in r:
                (tmp_path / r[k]).parent.mkdir(exist_ok=True)
                shutil.copy(world["images"].parent / r[k], tmp_path / r[k])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ask = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]  # noqa: E731
    bad = [
        "{not json",
        json.dumps({"task": "i2t", "image": "missing.png", "conversations": ask("<image>\nWhat colour?")}),
        json.dumps({"task": "i2t", "image": "corrupt.png", "conversations": ask("<image>\nWhat colour?")}),
        json.dumps({"conversations": [{"from": "human", "value": "Hello"}]}),
        json.dumps({"conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "Hello"}]}),
        json.dumps({"task": "t2i", "conversations": ask("Draw a red circle.")}),
        json.dumps({"task": "dance", "conversations": ask("Hi")}),
        json.dumps({"conversations": ask("What colours are there? " * 30)}),  # too long
    ]
    lines = [json.dumps(good[0]), *bad[:4], *map(json.dumps, good[1:]), *bad[4:]]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    expected = {"malformed": 1, "missing_image": 2, "corrupt_image": 1, "no_assistant": 1, "bad_turns": 1,
                "bad_task": 1, "too_long": 1}
    it, info = pipeline.make_dataset(data_cfg(tmp_path / "mixed.jsonl", on_too_long="drop"), tok, global_batch=4,
                                     seed=0, train=False)
    batches = list(it)
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    only_good = pipeline.make_dataset(data_cfg(tmp_path / "good.jsonl"), tok, global_batch=4, seed=0, train=False)
    assert len(batches) == 2 and rows(batches) == rows(list(only_good[0]))
    assert dict(info.skipped) == expected
    # training does not stop on them either; the reasons keep being counted each epoch
    it, info = pipeline.make_dataset(data_cfg(tmp_path / "mixed.jsonl", on_too_long="drop"), tok, global_batch=4,
                                     seed=0)
    take(it, 5)
    assert set(info.skipped) == set(expected) and sum(info.skipped.values()) >= 8


def test_truncation(world, tok, ids, tmp_path):
    long_text = {"conversations": [{"from": "human", "value": "What shapes are there?"},
                                   {"from": "gpt", "value": "circle, square and triangle " * 20}]}
    target = json.loads(Path(world["train"]).read_text().splitlines()[0])["target_image"]
    (tmp_path / target).parent.mkdir(exist_ok=True)
    shutil.copy(world["images"].parent / target, tmp_path / target)  # inside the data root
    long_gen = {"task": "t2i", "target_image": target,
                "conversations": [{"from": "human", "value": "Draw a red circle. " * 20}, {"from": "gpt", "value": ""}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(long_text) + "\n" + json.dumps(long_gen) + "\n")
    it, info = pipeline.make_dataset(data_cfg(tmp_path / "long.jsonl"), tok, global_batch=2, seed=0, train=False)
    (batch,) = list(it)
    assert batch["attention_mask"][0].sum() == 64 and (batch["labels"][0, -5:] != IGNORE).all()
    assert not batch["attention_mask"][1].any()  # cutting [SOI]..[EOI] would break generation: dropped
    assert dict(info.skipped) == {"too_long": 1}


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_counts(world, tok, tmp_path):
    lines = Path(world["train"]).read_text().splitlines()[:40] + ["{not json"] * 3
    (world["train"].parent / "with_bad.jsonl").write_text("\n".join(lines) + "\n")
    cfg = data_cfg(world["train"].parent / "with_bad.jsonl")
    ref_it, ref_info = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0)
    ref = take(ref_it, 12)
    cfg.worker_count = 1
    it, info = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0)
    assert_batches_equal(take(it, 12), ref)
    assert info.skipped == ref_info.skipped and info.skipped["malformed"] >= 3


# --- ArrayRecord ---------------------------------------------------------------------------------------------

def test_arrayrecord_round_trip(world, tok, tmp_path):
    src = tmp_path / "eval.jsonl"
    src.write_text(Path(world["eval"]).read_text() + "{not json\n")
    shutil.copytree(world["images"], tmp_path / "images")
    counts = arrayrecord.write(src, tmp_path / "eval.arrayrecord")
    assert counts == {"written": 60, "malformed": 1}
    shutil.rmtree(tmp_path / "images")  # the images now live inside the ArrayRecord file
    record = arrayrecord.unpack(arrayrecord.open_source(tmp_path / "eval.arrayrecord")[0])
    first = json.loads(src.read_text().splitlines()[0])
    assert record["conversations"] == first["conversations"]
    key = "image" if "image" in first else "target_image"
    assert record[key] == (world["images"].parent / first[key]).read_bytes()
    from_json = list(pipeline.make_dataset(data_cfg(world["eval"]), tok, global_batch=8, seed=0, train=False)[0])
    from_ar = list(pipeline.make_dataset(data_cfg(tmp_path / "eval.arrayrecord"), tok, global_batch=8, seed=0,
                                         train=False)[0])
    assert_batches_equal(from_ar, from_json)


# --- the synthetic world -------------------------------------------------------------------------------------

def test_synthetic_set_is_deterministic(world, tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}

    synthetic.make_synthetic(tmp_path / "a", num_train=400, num_eval=60, seed=0)
    synthetic.make_synthetic(tmp_path / "b", num_train=400, num_eval=60, seed=1)
    a, b, ref = files(tmp_path / "a"), files(tmp_path / "b"), files(world["train"].parent)
    assert a == {k: v for k, v in ref.items() if k in a}  # ref also holds the files other tests added
    assert a[Path("train.jsonl")] != b[Path("train.jsonl")]
    records = {s: [json.loads(x) for x in a[Path(f"{s}.jsonl")].decode().splitlines()] for s in ("train", "eval")}
    assert collections.Counter(r["task"] for r in records["train"]).keys() == {"i2t", "t2i", "edit", "text"}
    shown = {s: {synthetic.scene_of(r[k]) for r in rs for k in ("image", "target_image") if k in r}
             for s, rs in records.items()}
    assert not shown["train"] & shown["eval"]  # eval scenes are held out
    for r in records["train"]:
        if r["task"] == "edit":  # the target differs from the source in exactly the edited attribute
            diff = {k for k in r["meta"]["source"] if r["meta"]["source"][k] != r["meta"]["target"][k]}
            assert diff == {r["meta"]["attribute"]}


def test_synthetic_variants(tmp_path):
    """Variants are other renderings of the same scenes: held out by scene, judged right, kept by an edit."""
    paths = synthetic.make_synthetic(tmp_path, num_train=300, num_eval=60, seed=0, variants=4)
    records = {s: [json.loads(x) for x in paths[s].read_text().splitlines()] for s in ("train", "eval")}
    names = {s: {r[k] for r in rs for k in ("image", "target_image") if k in r} for s, rs in records.items()}
    assert {synthetic.variant_of(n) for n in names["train"]} == {0, 1, 2, 3}
    assert not {synthetic.scene_of(n) for n in names["train"]} & {synthetic.scene_of(n) for n in names["eval"]}
    for r in records["train"]:
        if r["task"] == "edit":
            assert synthetic.variant_of(r["image"]) == synthetic.variant_of(r["target_image"])
            assert synthetic.scene_of(r["target_image"]) == synthetic.Scene(**r["meta"]["target"])
    scene = synthetic.ALL_SCENES[0]
    renders = [synthetic.render(scene, 32, v) for v in range(8)]
    assert len({x.tobytes() for x in renders}) == 8  # every variant differs from the others
    for size in (32, 16):  # colour and kind at 32 px; colour at 16 (where small shapes blur together)
        n = 2 if size == 32 else 1
        judged = [synthetic.judge(synthetic.render(s, size, v))[:n] == (s.colour, s.kind)[:n]
                  for s in synthetic.ALL_SCENES for v in range(1, 9)]
        assert np.mean(judged) == 1.0, size
    on_disk = np.asarray(Image.open(paths["images"].parent / sorted(names["train"])[0]))
    name = sorted(names["train"])[0]
    assert np.array_equal(on_disk, synthetic.render(synthetic.scene_of(name), 32, synthetic.variant_of(name)))


def test_judge_scores_rendered_images(world):
    scenes = synthetic.ALL_SCENES
    exact = np.mean([synthetic.judge(synthetic.render(s)) == (s.colour, s.kind) for s in scenes])
    given_bg = np.mean([synthetic.judge(synthetic.render(s), s.background) == (s.colour, s.kind) for s in scenes])
    rng = np.random.default_rng(0)
    noisy = np.mean([synthetic.judge(np.clip(synthetic.render(s) + rng.normal(0, 8, (32, 32, 3)), 0, 255)
                                     .astype(np.uint8)) == (s.colour, s.kind) for s in scenes])
    assert exact >= 0.95 and given_bg >= 0.95 and noisy >= 0.95, (exact, given_bg, noisy)
    assert synthetic.judge(np.full((32, 32, 3), 255, np.uint8)) == (None, None)
    png = np.asarray(Image.open(next(world["images"].iterdir())))
    assert png.shape == (32, 32, 3) and png.dtype == np.uint8
