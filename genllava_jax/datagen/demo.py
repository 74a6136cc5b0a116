"""`make datagen-demo`: both makers on this CPU with the trained demo model (runs/demo/train, from `make demo`).

    .venv/bin/python -m genllava_jax.datagen.demo --workdir=runs/datagen --model=runs/demo/train

1. writes COCO-format annotations of --scenes scenes of the synthetic world (three captions each, the shape's box)
   and their images to <workdir>/world/;
2. llava: the demo model's LLM reads each scene's captions + box and is asked for a description, a conversation
   and a complex-reasoning exchange (configs/datagen/demo/: short requests in the world's words, the only ones it
   has seen) -> <workdir>/llava.jsonl;
3. stablellava: for --topics of the world's captions, the LLM writes an image prompt, two questions and two
   answers, one request per field (configs/datagen/demo/fields.toml); the demo model's own generation renders each
   prompt ("Generate an image of {prompt}."); the world's pixel judge keeps an image only if it shows the colour its
   prompt names -> <workdir>/stablellava.jsonl + stablellava_images/; --reply_topics of them asked for the one-reply
   structured format (configs/datagen/stablellava/dialogue.toml, cut at 64 tokens) -> stablellava_reply.jsonl, to
   show what this LLM makes of it;
4. reads every output back through the training pipeline (genllava_jax.data) and writes kept / filtered-by-reason
   counts, the judge's numbers, the read-back and timings to <workdir>/report.json, and prints a few records.

The demo's LLM is tiny (3 layers, a 253-token vocabulary) and was trained only on the world's short questions,
answers and captions: its text is short and often wrong about the scene (it does not read the context as a chat
LLM would), and it cannot write a Question:/Answer: format at all. The numbers show what the pipeline keeps and
filters; data worth training on needs a real chat LLM (e.g. Mistral-7B-Instruct, `python -m convert mistral`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

from absl import flags, logging

from genllava_jax import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags, defined only when it runs: genllava_jax.demo defines a --workdir too (one process may
    import both, e.g. a test session)."""
    flags.DEFINE_string("workdir", "runs/datagen", "everything the demo writes (its earlier outputs are replaced)")
    flags.DEFINE_string("model", "runs/demo/train", "the trained demo model's workdir (make demo)")
    flags.DEFINE_integer("scenes", 32, "world scenes for llava (x 3 requests)")
    flags.DEFINE_integer("topics", 64, "world captions for stablellava")
    flags.DEFINE_integer("reply_topics", 16, "of those, asked for the one-reply dialogue format too")
    flags.DEFINE_integer("steps", 20, "DDIM steps when rendering")
    flags.DEFINE_float("guidance", 3.0, "classifier-free guidance when rendering")
    flags.DEFINE_integer("seed", 0, "sampling seed")


OUTPUTS = ("world", "llava", "stablellava", "stablellava_images", "stablellava_reply", "report.json")


def run(workdir, model_dir, num_scenes: int = 32, num_topics: int = 64, steps: int = 20, guidance: float = 3.0,
        seed: int = 0, num_reply_topics: int = 16) -> dict:
    from genllava_jax import cli
    from genllava_jax.data import synthetic
    from genllava_jax.datagen import coco, llava, output, prompts, stablellava as sl, world
    from genllava_jax.datagen.llm import ChatLLM, local_mesh

    workdir, t0 = Path(workdir), time.time()
    if not (Path(model_dir) / "checkpoints").is_dir():
        raise errors.MissingFile(f"--model={model_dir}: no trained model; run `make demo` first")
    for name in OUTPUTS:  # a fresh run: the demo's own files only
        for p in workdir.glob(f"{name}*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    rng = random.Random(seed)
    scenes = rng.sample(synthetic.ALL_SCENES, num_scenes)
    topics = rng.sample(sorted(set(world.topics(synthetic.ALL_SCENES))), num_topics)  # 180 distinct captions
    (workdir / "topics.txt").parent.mkdir(parents=True, exist_ok=True)
    (workdir / "topics.txt").write_text("".join(t + "\n" for t in topics))
    captions, instances, images = world.write_coco(workdir / "world", scenes, 32)

    mesh = local_mesh("data=-1")
    assistant, _ = cli.load_assistant(model_dir, mesh)
    chat = ChatLLM(assistant.model.llm, assistant.tokenizer, mesh=mesh, batch_size=32, temperature=0.7, top_p=0.9,
                   seed=seed, length_buckets=(64, 128, 256, 512, 1024, 2048))
    times, report = {"setup_s": round(time.time() - t0, 1)}, {"model": str(model_dir)}
    demo_prompts = prompts.default_dir() / "demo"

    t = time.time()
    ps = {n: prompts.load(demo_prompts / f"{n}.toml", {"context"}) for n in ("detail", "conversation", "complex")}
    out = output.Output(workdir / "llava.jsonl", {"demo": True})
    report["llava"] = llava.make(coco.read(captions, instances), images, chat, ps, out, progress=True)
    out.close()
    report["llava"]["kept_by_type"] = _by_type(workdir / "llava.jsonl")
    times["llava_s"] = round(time.time() - t, 1)

    t = time.time()
    render = sl.GenLLaVARenderer(assistant, batch_size=32, num_steps=steps, guidance_scale=guidance,
                                 template="Generate an image of {}.", seed=seed)
    judged: list = []

    def judge(prompt, image):
        reason = world.judge(prompt, image)
        judged.append((prompt, synthetic.judge(image), reason))
        return reason

    topics = sl.read_topics(workdir / "topics.txt")
    out = output.Output(workdir / "stablellava.jsonl", {"demo": True})
    report["stablellava"] = sl.make(topics, chat, prompts.load_fields(demo_prompts / "fields.toml"), render, out,
                                    judge=judge, progress=True)
    out.close()
    kinds = [world.named(p)[1] == seen[1] for p, seen, reason in judged if reason is None and world.named(p)[1]]
    report["judge"] = {
        "rendered": len(judged), "colour_named": sum(r != "judge_unnamed" for _, _, r in judged),
        "colour_right": sum(r is None for _, _, r in judged),
        "kind_right_of_kept_naming_one": f"{sum(kinds)}/{len(kinds)}",
        "rule": "kept if synthetic.judge reads the colour the image prompt names (its kind reading is unreliable "
                "at the demo's 16 px)"}
    times["stablellava_s"] = round(time.time() - t, 1)

    t = time.time()  # the one-reply format, on a few topics and cut at 64 tokens (this LLM's replies are short)
    dialogue = prompts.load(prompts.default_dir() / "stablellava" / "dialogue.toml", {"topic"})
    out = output.Output(workdir / "stablellava_reply.jsonl", {"demo": True})
    report["stablellava_reply"] = sl.make(topics[:num_reply_topics], chat,
                                          dataclasses.replace(dialogue, max_new_tokens=64), render, out, judge=judge,
                                          progress=True)
    out.close()
    times["stablellava_reply_s"] = round(time.time() - t, 1)

    report["read_back"] = {name: _read_back(workdir / name, model_dir)
                           for name in ("llava.jsonl", "stablellava.jsonl")}
    times["total_s"] = round(time.time() - t0, 1)
    report["times"] = times
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _by_type(path: Path) -> dict:
    from collections import Counter

    return dict(Counter(json.loads(x)["meta"]["type"] for x in path.read_text().splitlines()))


def _read_back(path: Path, model_dir) -> dict:
    """Rows the training pipeline yields from a file (one pass, in order) and what it skipped, by reason."""
    if not path.read_text().strip():  # all filtered: the pipeline refuses a file with no records
        return {"rows": 0, "skipped": {}, "truncated": {}}
    import ml_collections

    from genllava_jax.data.pipeline import make_dataset
    from genllava_jax.data.tokenizer import load_tokenizer

    c = ml_collections.ConfigDict(json.loads((Path(model_dir) / "config.json").read_text()))
    data = c.data
    data.update(path=str(path), worker_count=0, image_root="")
    it, info = make_dataset(data, load_tokenizer(data.tokenizer, data.num_img_tokens), global_batch=8, seed=0,
                            train=False)
    rows = sum(int(b["attention_mask"].any(1).sum()) for b in it)
    return {"rows": rows, "skipped": dict(info.skipped), "truncated": dict(info.counts.fixed)}


def _show(path: Path, n: int) -> list[str]:
    lines = []
    for x in path.read_text().splitlines()[:n]:
        r = json.loads(x)
        turns = " | ".join(f"{c['from']}: {c['value']!r}" for c in r["conversations"])
        extra = f" (image prompt {r['meta']['image_prompt']!r})" if "image_prompt" in r["meta"] else ""
        lines.append(f"  {r['id']}: {r['image']}{extra}\n    {turns}")
    return lines


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO

    r = run(FLAGS.workdir, FLAGS.model, FLAGS.scenes, FLAGS.topics, FLAGS.steps, FLAGS.guidance, FLAGS.seed,
          FLAGS.reply_topics)
    w = Path(FLAGS.workdir)
    for name in ("llava", "stablellava", "stablellava_reply"):
        print(f"{name}: kept {r[name]['kept']} of {r[name]['total']}, filtered {r[name]['filtered'] or 'none'}")
    j = r["judge"]
    print(f"judge: {j['colour_right']} of {j['rendered']} rendered images show the colour their prompt names "
          f"({j['colour_named']} prompts name one)")
    print(f"read back by genllava_jax.data: {r['read_back']}")
    print("llava records:\n" + "\n".join(_show(w / "llava.jsonl", 3)))
    print("stablellava records:\n" + "\n".join(_show(w / "stablellava.jsonl", 3)))
    print(f"report: {w / 'report.json'}; {r['times']['total_s'] / 60:.1f} min in all")


if __name__ == "__main__":
    define_flags()
    errors.run(main)
