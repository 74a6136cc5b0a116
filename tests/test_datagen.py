"""Machine-generated instruction data (genllava_jax.datagen): the context builder, the reply parsers and filters on
written fixtures, the prompt files, the edit converters, and the makers end to end on a tiny random Mistral and a
tiny Stable Diffusion through the real jitted paths (sharded over processes, resumed after a kill)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from genllava_jax.datagen import coco, edit, output, prompts, replies

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures" / "datagen"


def reply(name: str) -> str:
    return (FIX / name).read_text()


# --- the context builder ------------------------------------------------------------------------------------------


def test_context_of_a_hand_written_coco_annotation():
    entries = coco.read(FIX / "coco_captions.json", FIX / "coco_instances.json")
    assert [e.image_id for e in entries] == [7, 9]  # image 11 has neither captions nor boxes
    assert coco.context(entries[0]) == (
        "A cat sits on a kitchen counter next to a kettle.\n"
        "A grey cat beside a silver kettle.\n"
        "\n"
        "cat: [0.100, 0.250, 0.500, 0.750]\n"
        "kettle: [0.625, 0.200, 0.812, 0.501]")
    # a box over the image's edge is clipped to [0, 1]
    assert coco.context(entries[1]).splitlines()[-1] == "person: [0.900, 0.200, 1.000, 1.000]"
    assert coco.context(coco.read(captions=FIX / "coco_captions.json")[1]) == "Two people walk along a sandy beach."
    assert coco.context(coco.read(instances=FIX / "coco_instances.json")[1]).startswith("person: [0.100, 0.250")


def test_coco_errors_name_the_file_and_record(tmp_path):
    bad = json.loads((FIX / "coco_instances.json").read_text())
    bad["annotations"][1]["category_id"] = 99
    (tmp_path / "i.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"i.json: annotations\[1\]: category_id 99"):
        coco.read(instances=tmp_path / "i.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco.read(captions=tmp_path / "nope.json")


# --- replies: parsers and filters ---------------------------------------------------------------------------------


def test_well_formed_conversation_is_parsed_turn_by_turn():
    turns = replies.read("conversation", reply("conversation_good.txt"), True, 600)
    assert turns == [("What animal is on the counter?", "A grey cat is sitting on the kitchen counter."),
                     ("What is next to it?", "A silver kettle stands to its right,\na little further back on the "
                                             "counter."),
                     ("Is the cat inside or outside?", "Inside, in a kitchen.")]


@pytest.mark.parametrize("name, finished, reason", [
    ("conversation_malformed.txt", True, "malformed"),
    ("conversation_truncated.txt", False, "unfinished"),
    ("conversation_repetitive.txt", True, "repetitive"),
    ("conversation_coordinates.txt", True, "coordinates"),
    ("conversation_prose.txt", True, "no_turns"),
    ("conversation_good.txt", True, None),
])
def test_conversation_filters(name, finished, reason):
    if reason is None:
        replies.read("conversation", reply(name), finished, 600)
        with pytest.raises(replies.Rejected, match="too_long"):
            replies.read("conversation", reply(name), finished, 20)
        return
    with pytest.raises(replies.Rejected) as e:
        replies.read("conversation", reply(name), finished, 600)
    assert e.value.reason == reason


def test_more_filters():
    with pytest.raises(replies.Rejected, match="empty"):
        replies.read("description", "  \n", True, 300, question="Describe it.")
    with pytest.raises(replies.Rejected, match="special_token"):
        replies.read("conversation", "Question: What is it?\nAnswer: A cat </s> [INST] hi", True, 600)
    with pytest.raises(replies.Rejected, match="repetitive"):  # the same question twice
        replies.read("conversation", "Q: What is it?\nA: A cat.\nQ: what is  it?\nA: Still a cat.", True, 600)
    with pytest.raises(replies.Rejected, match="repetitive"):
        replies.read("text", "red red red red", True, 10)
    with pytest.raises(replies.Rejected, match="empty"):
        replies.read("conversation", "Question: What is it?\nAnswer:", True, 600)
    assert replies.read("description", "A cat on a counter.", True, 300, question="Describe it.") == [
        ("Describe it.", "A cat on a counter.")]
    assert replies.read("text", "Question:  What colour\n is it?", True, 50) == "What colour is it?"


def test_dialogue_reply():
    image, turns = replies.read("dialogue", reply("dialogue_good.txt"), True, 450)
    assert image.startswith("a grey cat sitting on a white kitchen counter") and image.endswith("photograph")
    assert turns == [("What colour is the cat?", "The cat is grey."), ("What is beside it?", "A shiny silver kettle.")]
    with pytest.raises(replies.Rejected, match="no_image_prompt"):
        replies.read("dialogue", reply("dialogue_no_image.txt"), True, 450)


# --- prompt files and templates -------------------------------------------------------------------------------


def test_shipped_prompt_files_load():
    d = prompts.default_dir()
    for name in ("conversation", "detail", "complex"):
        p = prompts.load(d / "llava" / f"{name}.toml", {"context"})
        r = p.request("x", context="a cat")
        assert r.user == "a cat" and r.system and len(r.turns) == len(p.examples) >= 1
        assert all(u and a for u, a in r.turns)
        for ex in p.examples:  # the in-context examples pass the filters they teach
            replies.read(p.kind, ex["reply"], True, p.max_words, question="Describe it.")
    dialogue = prompts.load(d / "stablellava" / "dialogue.toml", {"topic"})
    for ex in dialogue.examples:
        replies.read("dialogue", ex["reply"], True, dialogue.max_words)
    fields = prompts.load_fields(d / "stablellava" / "fields.toml")
    assert fields.turns == 2 and "{dialogue}" in fields.answer.user
    prompts.load(d / "stablellava" / "brainstorm.toml", {"count", "index"})
    t = edit.load_templates(d / "edit_templates.toml")
    assert len(t["t2i"]) >= 5 and len(t["edit"]) >= 5


def test_prompt_file_errors(tmp_path):
    (tmp_path / "p.toml").write_text('kind = "description"\nuser = "{context}"\n')
    with pytest.raises(ValueError, match="p.toml: a description prompt needs `questions`"):
        prompts.load(tmp_path / "p.toml")
    (tmp_path / "p.toml").write_text('user = "{contxt}"\n')
    with pytest.raises(ValueError, match=r"names \['contxt'\]"):
        prompts.load(tmp_path / "p.toml", {"context"})
    (tmp_path / "p.toml").write_text('user = "{context}"\nmax_tokens = 3\n')
    with pytest.raises(ValueError, match=r"unknown keys \['max_tokens'\]"):
        prompts.load(tmp_path / "p.toml")


# --- output: shards and resume ------------------------------------------------------------------------------------


def test_output_resumes_after_a_torn_line_and_refuses_other_settings(tmp_path):
    out = output.Output(tmp_path / "a.jsonl", {"x": 1})
    out.keep({"id": "1", "task": "text"})
    out.reject("2", "empty", "", "")
    out.checkpoint()
    out.close()
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"id": "3", "ta')  # killed mid-write
    again = output.Output(tmp_path / "a.jsonl", {"x": 1})
    assert again.done == {"1", "2"} and again.report() == {"kept": 1, "filtered": {"empty": 1}, "total": 2}
    again.close()
    assert (tmp_path / "a.jsonl").read_text().endswith("}\n")
    with pytest.raises(ValueError, match=r"made with other settings \(x: 1 -> 2\)"):
        output.Output(tmp_path / "a.jsonl", {"x": 2})
    assert output.shard_path(tmp_path / "a.jsonl", 1, 3).name == "a-00001-of-00003.jsonl"
    items = list(range(10))
    assert sorted(sum((output.shard_of(items, i, 3) for i in range(3)), [])) == items


# --- edit converters ----------------------------------------------------------------------------------------------


def _png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(path)


def _data_reads(path, tokenizer_dir, image_root=None, num_img_tokens=4):
    """(records the training pipeline yields, its skip counts) reading `path` once in file order."""
    from micro import micro_config  # noqa: F401  (marks absl flags parsed: grain reads them)

    from genllava_jax.data.pipeline import default_data_config, make_dataset
    from genllava_jax.data.tokenizer import load_tokenizer

    c = default_data_config()
    c.update(path=str(path), tokenizer=str(tokenizer_dir), max_len=256, image_size=16, num_patches=4,
             target_image_size=16, num_img_tokens=num_img_tokens, read_threads=1, image_root=str(image_root or ""))
    it, info = make_dataset(c, load_tokenizer(tokenizer_dir, num_img_tokens), global_batch=4, seed=0, train=False)
    rows = sum(int(b["attention_mask"].any(1).sum()) for b in it)
    return rows, dict(info.skipped)


def test_edit_and_t2i_converters_write_records_the_pipeline_reads(tmp_path, data_dir):
    src = tmp_path / "src"
    _png(src / "ip2p" / "0001" / "42_0.jpg", 10), _png(src / "ip2p" / "0001" / "42_1.jpg", 200)
    (src / "ip2p" / "0001" / "prompt.json").write_text(json.dumps(
        {"input": "a dog", "edit": "Make it a cat.", "output": "a cat"}))
    _png(src / "ip2p" / "0002" / "7_0.jpg", 30), _png(src / "ip2p" / "0002" / "7_1.jpg", 90)
    (src / "ip2p" / "0002" / "prompt.json").write_text(json.dumps({"edit": "add snow", "output": "snowy hill"}))
    rows = edit.read_triplets(src / "ip2p")
    assert [r["id"] for r in rows] == ["0001/42", "0002/7"] and rows[1]["caption"] == "snowy hill"
    templates = edit.load_templates(prompts.default_dir() / "edit_templates.toml")
    out = output.Output(src / "edit.jsonl", {})
    assert edit.make("edit", rows, templates, out, progress=False)["kept"] == 2
    out.close(arrayrecord=True)
    recs = [json.loads(x) for x in (src / "edit.jsonl").read_text().splitlines()]
    assert recs[0]["image"] == "ip2p/0001/42_0.jpg" and recs[0]["target_image"] == "ip2p/0001/42_1.jpg"
    assert recs[0]["conversations"][0]["value"].startswith("<image>\n") and recs[0]["caption"] == "a cat"
    turn = recs[1]["conversations"][0]["value"]
    assert "snow" in turn and turn in ["<image>\n" + t.format(instruction="add snow", instruction_lc="add snow")
                                       for t in templates["edit"]]

    pairs = [{"caption": f"A red circle number {i}.", "image": f"img/{i}.png"} for i in range(6)]
    for i in range(6):
        _png(src / "img" / f"{i}.png", 20 * i)
    (src / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:5]) + json.dumps(
        {"caption": "gone", "image": "img/missing.png"}) + "\n")
    out = output.Output(src / "t2i.jsonl", {})
    report = edit.make("t2i", edit.read_pairs(src / "pairs.jsonl"), templates, out, progress=False)
    out.close(arrayrecord=True)
    assert report == {"kept": 5, "filtered": {"missing_image": 1}, "total": 6}
    turns = {json.loads(x)["conversations"][0]["value"] for x in (src / "t2i.jsonl").read_text().splitlines()}
    assert len(turns) >= 3  # the templates vary
    for f in ("edit.jsonl", "t2i.jsonl", "edit.arrayrecord", "t2i.arrayrecord"):
        n, skipped = _data_reads(src / f, data_dir / "tokenizer")
        assert (n, skipped) == ((2 if f.startswith("edit") else 5), {}), f


# --- the makers end to end: a tiny random Mistral and a tiny Stable Diffusion ------------------------------------

TEST_PROMPTS = {
    "detail.toml": 'kind = "description"\nmax_new_tokens = 32\nmax_words = 60\nsystem = "Describe the image."\n'
                   'user = "{context}"\nquestions = ["Describe the image.", "What is in the picture?"]\n',
    "conversation.toml": 'kind = "conversation"\nmax_new_tokens = 32\nsystem = "Write a conversation."\n'
                         'user = "{context}"\n',
    "fields.toml": 'turns = 2\nmax_words = 200\n[image_prompt]\nmax_new_tokens = 24\nuser = "Draw {topic}."\n'
                   '[question]\nmax_new_tokens = 24\nuser = "{image_prompt}. {dialogue} Ask."\n'
                   '[answer]\nmax_new_tokens = 24\nuser = "{image_prompt}. {dialogue} {question}"\n',
    "dialogue.toml": 'kind = "dialogue"\nmax_new_tokens = 32\nuser = "{topic}"\n',
}
LLAVA_SCENES = 96  # x 2 prompt files = 192 records: enough chunks for a kill to land mid-run


@pytest.fixture(scope="module")
def tiny_llm(data_dir, tmp_path_factory):
    """A tiny random MistralForCausalLM (with the world's tokenizer), saved as a Hugging Face folder.

    Its weights are random except one channel: every token embedding carries a constant 30 in dimension 0, which no
    layer writes to, and the final norm keeps only that dimension, so the head sees the same vector at every
    position and samples tokens i.i.d. from a distribution set in the head: </s> 12 %, the other text tokens evenly,
    special tokens never. Its replies then end (about 8 tokens) and some pass the filters, which a fully random model
    (almost never emitting </s>) would not give.
    """
    import math

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from genllava_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data_dir / "tokenizer", 4)
    V, D = len(tok), 32
    cfg = MistralConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, rope_theta=10000.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    words = [i for i in range(V) if i not in special]
    logits = torch.full((V,), -30.0)
    logits[words] = math.log(0.88 / len(words))
    logits[tok.eos_token_id] = math.log(0.12)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 30.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits / math.sqrt(D)  # the normed dimension 0 is sqrt(D) (30 dominates)
    folder = tmp_path_factory.mktemp("llm") / "mistral"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def world_inputs(tmp_path_factory):
    from genllava_jax.data import synthetic
    from genllava_jax.datagen import world

    root = tmp_path_factory.mktemp("gen")
    captions, instances, images = world.write_coco(root / "world", synthetic.ALL_SCENES[:LLAVA_SCENES], 32)
    (root / "topics.txt").write_text("\n".join(world.topics(synthetic.ALL_SCENES[::45])) + "\n")
    for name, text in TEST_PROMPTS.items():
        (root / "prompts").mkdir(exist_ok=True)
        (root / "prompts" / name).write_text(text)
    return root, captions, instances, images


LLM_KW = dict(batch_size=8, length_buckets=(128, 256), temperature=1.0, top_p=1.0, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_llm, world_inputs, tmp_path_factory):
    """Both makers run in this process through the real jitted paths (decode over 8 devices, SD text-to-image)."""
    from micro import tiny_sd_pipeline

    from genllava_jax import sd
    from genllava_jax.datagen import llava, llm, stablellava as sl

    root, captions, instances, images = world_inputs
    chat, _ = llm.load(tiny_llm, mesh=llm.local_mesh("data=-1"), **LLM_KW)
    ps = {n: prompts.load(root / "prompts" / f"{n}.toml", {"context"}) for n in ("detail", "conversation")}
    out = output.Output(root / "ref" / "llava.jsonl", {})
    llava_report = llava.make(coco.read(captions, instances), images, chat, ps, out, chunk=16, progress=False)
    out.close(arrayrecord=True, image_root=root)
    llava_shapes = set(chat.shapes)

    pipe = sd.load(tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))[1], chat.mesh)
    render = sl.SDRenderer(pipe, batch_size=8, num_steps=3, guidance_scale=2.0, seed=3)
    topics = sl.read_topics(root / "topics.txt")
    out = output.Output(root / "ref" / "stablellava.jsonl", {})
    fields = prompts.load_fields(root / "prompts" / "fields.toml")
    sl_report = sl.make(topics, chat, fields, render, out, chunk=8, progress=False)
    out.close(arrayrecord=True)
    out = output.Output(root / "ref" / "reply.jsonl", {})
    reply_report = sl.make(topics, chat, prompts.load(root / "prompts" / "dialogue.toml"), render, out,
                           progress=False)
    out.close()
    return dict(chat=chat, llava=llava_report, llava_shapes=llava_shapes, sl=sl_report, reply=reply_report,
                root=root, topics=topics)


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()] if Path(path).exists() else []


@pytest.mark.slow
def test_makers_end_to_end_write_records_the_pipeline_reads(reference, data_dir):
    from genllava_jax.datagen import llm

    root, r = reference["root"], reference
    n = 2 * LLAVA_SCENES
    assert r["llava"]["total"] == n and r["llava"]["kept"] >= 40, r["llava"]
    # the random LLM writes no Question:/Answer: markers: every conversation is filtered, by reason
    rejected = _lines(root / "ref" / "llava.rejected.jsonl")
    reasons = [x["reason"] for x in rejected if x["id"].endswith("-conversation")]
    assert len(reasons) == LLAVA_SCENES and "no_turns" in reasons and set(reasons) <= {"no_turns", "empty",
                                                                                        "unfinished"}
    assert all(x["reply"] is not None for x in rejected)
    kept = _lines(root / "ref" / "llava.jsonl")
    assert len(kept) == r["llava"]["kept"] and {x["meta"]["type"] for x in kept} == {"detail"}
    for rec in kept:
        assert rec["task"] == "i2t" and rec["conversations"][0]["value"].split("\n")[0] == "<image>"
        assert rec["conversations"][0]["value"].split("\n", 1)[1] in ("Describe the image.", "What is in the picture?")
        assert (root / "ref" / rec["image"]).is_file()
    # one compile per (prompt bucket, max_new_tokens)
    assert llm._decode._cache_size() >= len(r["llava_shapes"]) and len(r["llava_shapes"]) <= 2

    assert r["sl"]["total"] == len(reference["topics"]) and r["sl"]["kept"] >= 3, r["sl"]
    recs = _lines(root / "ref" / "stablellava.jsonl")
    for rec in recs:
        assert len(rec["conversations"]) == 4 and rec["meta"]["image_prompt"]
        from PIL import Image

        assert Image.open(root / "ref" / rec["image"]).size == (16, 16)
    assert r["reply"]["kept"] == 0 and "no_image_prompt" in r["reply"]["filtered"]

    for name, image_root in (("llava.jsonl", root), ("llava.arrayrecord", None), ("stablellava.jsonl", None),
                             ("stablellava.arrayrecord", None)):
        rows, skipped = _data_reads(root / "ref" / name, data_dir / "tokenizer", image_root)
        assert (rows, skipped) == ((r["llava"] if name.startswith("llava") else r["sl"])["kept"], {}), name


@pytest.mark.slow
def test_a_request_samples_the_same_reply_in_any_batch(reference):
    from genllava_jax.datagen.llm import Request

    chat = reference["chat"]
    reqs = [Request(f"k{i}", (), f"a red circle number {i}", 32) for i in range(5)]
    together = chat.complete(reqs)
    alone = [chat.complete([q])[0] for q in reqs[:3]]
    assert together[:3] == alone and len({c.text for c in together}) >= 3  # and the keys do differ


def _cli(tiny_llm, world_inputs, out, *extra):
    root, captions, instances, images = world_inputs
    return [sys.executable, "-m", "genllava_jax.datagen", "llava", f"--llm={tiny_llm}", f"--captions={captions}",
            f"--instances={instances}", f"--images={images}", f"--out={out}",
            f"--prompts={root / 'prompts' / 'detail.toml'},{root / 'prompts' / 'conversation.toml'}",
            "--batch_size=8", "--length_buckets=128,256", "--temperature=1.0", "--top_p=1.0", "--seed=3",
            "--no_progress", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_that_cover_the_input(reference, tiny_llm, world_inputs, tmp_path):
    out = tmp_path / "llava.jsonl"
    procs = [subprocess.Popen(_cli(tiny_llm, world_inputs, out, f"--shard={i}", "--num_shards=2"), cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    ids = []
    for i in range(2):
        shard = tmp_path / f"llava-{i:05d}-of-00002.jsonl"
        ids.append({x["id"] for x in _lines(shard)} | {x["id"] for x in _lines(
            tmp_path / f"llava-{i:05d}-of-00002.rejected.jsonl")})
    everything = {f"{i}-{t}" for i in range(LLAVA_SCENES) for t in ("detail", "conversation")}
    assert not ids[0] & ids[1] and ids[0] | ids[1] == everything
    # per-record seeds: each record is the one the single-process run wrote, whatever its batch
    ref = {x["id"]: x for x in _lines(reference["root"] / "ref" / "llava.jsonl")}
    got = {x["id"]: x for i in range(2) for x in _lines(tmp_path / f"llava-{i:05d}-of-00002.jsonl")}
    assert got.keys() == ref.keys() and all(got[k]["conversations"] == ref[k]["conversations"] for k in ref)
    assert output.totals(out) == reference["llava"]


@pytest.mark.slow
def test_a_killed_run_resumed_writes_every_id_once(reference, tiny_llm, world_inputs, tmp_path):
    from genllava_jax.datagen.__main__ import main

    out = tmp_path / "llava.jsonl"
    cmd = _cli(tiny_llm, world_inputs, out, "--chunk=8")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    written = lambda: len(_lines(out)) + len(_lines(tmp_path / "llava.rejected.jsonl"))  # noqa: E731
    deadline = time.time() + 600
    while written() < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = written()
    assert 8 <= before < 2 * LLAVA_SCENES
    assert main(cmd[3:]) == 0  # resumed, in this process
    kept, rejected = _lines(out), _lines(tmp_path / "llava.rejected.jsonl")
    ids = [x["id"] for x in kept + rejected]
    assert len(ids) == len(set(ids)) == 2 * LLAVA_SCENES
    ref = {x["id"]: x for x in _lines(reference["root"] / "ref" / "llava.jsonl")}
    assert {x["id"]: x["conversations"] for x in kept} == {k: v["conversations"] for k, v in ref.items()}
    assert json.loads((tmp_path / "llava.report.json").read_text()) == reference["llava"]


def test_a_converted_mistral_folder_is_an_llm(tiny_llm, tmp_path, capsys):
    """`python -m convert mistral` output as --llm (its tokenizer from --tokenizer) on the hand-written COCO
    annotation: the records and rejections, counted, are those of the Hugging Face folder it came from; a wrong
    folder is one line naming it."""
    from convert.__main__ import main as convert_main
    from genllava_jax import errors
    from genllava_jax.datagen.__main__ import main

    ours = tmp_path / "mistral-ours"
    assert convert_main(["mistral", "--from-hf", str(tiny_llm), "--out", str(ours)]) == 0
    _png(tmp_path / "images" / "kitchen.jpg", 60), _png(tmp_path / "images" / "beach.jpg", 180)
    (tmp_path / "prompts").mkdir()
    for name in ("detail.toml", "conversation.toml"):
        (tmp_path / "prompts" / name).write_text(TEST_PROMPTS[name])

    def run(llm, out, *extra):
        return errors.guard(main, [
            "llava", f"--llm={llm}", *extra, f"--captions={FIX / 'coco_captions.json'}",
            f"--instances={FIX / 'coco_instances.json'}", f"--images={tmp_path / 'images'}", f"--out={out}",
            f"--prompts={tmp_path / 'prompts'}", "--batch_size=8", "--length_buckets=128,256", "--temperature=1.0",
            "--top_p=1.0", "--seed=3", "--no_progress"])

    assert run(ours, tmp_path / "ours" / "llava.jsonl", f"--tokenizer={tiny_llm}") == 0
    assert run(tiny_llm, tmp_path / "hf" / "llava.jsonl") == 0
    report = json.loads((tmp_path / "ours" / "llava.report.json").read_text())
    kept, rejected = _lines(tmp_path / "ours" / "llava.jsonl"), _lines(tmp_path / "ours" / "llava.rejected.jsonl")
    assert report["total"] == 4 and len(kept) == report["kept"] and len(rejected) == sum(report["filtered"].values())
    assert {x["id"] for x in kept + rejected} == {f"{i}-{t}" for i in (7, 9) for t in ("detail", "conversation")}
    assert {x["reason"] for x in rejected if x["id"].endswith("conversation")} <= {"no_turns", "empty", "unfinished"}
    for rec in kept:
        assert rec["conversations"][0]["value"].startswith("<image>\n") and rec["image"] in (
            "../images/kitchen.jpg", "../images/beach.jpg")
    assert json.loads((tmp_path / "hf" / "llava.report.json").read_text()) == report
    assert _lines(tmp_path / "hf" / "llava.jsonl") == kept
    assert [x["reply"] for x in _lines(tmp_path / "hf" / "llava.rejected.jsonl")] == [x["reply"] for x in rejected]
    assert "llava.jsonl: kept" in capsys.readouterr().out

    # wrong folders: one line each, naming the folder
    (tmp_path / "clip-ours").mkdir(), (tmp_path / "clip-hf").mkdir()
    (tmp_path / "clip-ours" / "config.json").write_text(json.dumps({"part": "clip", "config": {}}))
    (tmp_path / "clip-hf" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    tok = f"--tokenizer={tiny_llm}"
    for llm, extra, says in ((ours, (), "no tokenizer"), (tmp_path / "images", (), "no config.json"),
                             (tmp_path / "clip-ours", (tok,), "a converted 'clip', not a Mistral"),
                             (tmp_path / "clip-hf", (tok,), "a Hugging Face 'clip' model")):
        assert run(llm, tmp_path / "bad" / "llava.jsonl", *extra) == errors.USER_ERROR_STATUS
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--llm={llm}" in err and says in err, err
    assert not (tmp_path / "bad").exists()


def test_stablellava_wrong_render_folders_fail_before_the_output_starts(tiny_llm, tmp_path, capsys):
    from genllava_jax import errors
    from genllava_jax.datagen.__main__ import main

    (tmp_path / "topics.txt").write_text("a red circle\n")
    base = ["stablellava", f"--llm={tiny_llm}", f"--topics={tmp_path / 'topics.txt'}", f"--out={tmp_path / 'o.jsonl'}"]
    for extra, says in (((), "renders with --sd=FOLDER or --genllava"), ((f"--sd={tmp_path / 'nosd'}",), "--sd="),
                        ((f"--genllava={tmp_path}",), "not a training workdir"),
                        ((f"--sd={tmp_path}", f"--clip={tmp_path / 'noclip'}"), "--clip=")):
        assert errors.guard(main, base + list(extra)) == errors.USER_ERROR_STATUS
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert list(tmp_path.iterdir()) == [tmp_path / "topics.txt"]
