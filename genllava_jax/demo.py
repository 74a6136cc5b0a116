"""`make demo`: a tiny GenLLaVA learns to understand, generate and edit images of a synthetic world on this CPU.

    .venv/bin/python -m genllava_jax.demo --workdir=runs/demo

1. writes the synthetic world of coloured shapes (records + 32 px PNGs of every scene in `--variants` renderings +
   a BPE tokenizer) to <workdir>/data;
2. fits the tiny VAE on the training scenes (at 16 px, the generation size) and freezes it (<workdir>/vae; the real
   model's SD VAE is pretrained too), and reports how often its own reconstructions of held-out targets are judged
   the right colour: the ceiling it puts on generation;
3. joint-trains the tiny GenLLaVA with configs/tiny.py (<workdir>/train: checkpoints, metrics.jsonl, tb/);
4. evaluates on held-out scenes and prints, and writes to <workdir>/metrics.json:
   understanding_accuracy  exact answers to questions about held-out images (and by kind of question);
   generation and editing through the evaluation sweep's code (`sweep.run`, as a user's sweep scores them): the
   held-out prompts written as a t2i prompt file and the held-out edits as a MagicBrush-style file (the world's
   PNGs) in <workdir>/sweep, run on the trained checkpoint in two settings: `own` (an image only when the model
   ends its answer with [SOI] itself) and `forced` ([SOI][IMG..] teacher-forced after every answer; metrics named
   forced/...). From the sweep: generation_soi_rate / editing_soi_rate, *_images, editing_l1 / editing_l2
   (MagicBrush's); its CLIP score, FID, CLIP-I, DINO and CLIP-T need encoder weights this machine does not have,
   so, as in the sweep, they are left out. Then the pixel judge on the images the sweep saved:
   generation_accuracy     generated images whose shape colour *and* kind match the prompt,
   editing_accuracy        edited images whose colour and kind match the edit's target,
   plus the colour-only accuracies (chance: 1/6); an answer without [SOI] (no image) counts as wrong. Images are
   judged by `synthetic.judge`: pixel statistics (foreground = pixels far from the border colour; colour =
   nearest palette colour of its median; kind = fill ratio of its bounding box), stated so the numbers can be
   checked. Sample grids go to <workdir>/*.png;
5. chats with, generates from and edits with the trained model through the CLIs' code path (<workdir>/generate.png,
   <workdir>/edit.png).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags, logging
from PIL import Image

from genllava_jax import errors

flags.DEFINE_string("workdir", "runs/demo", "everything the demo writes")
flags.DEFINE_integer("train_steps", None, "joint train steps (default: configs/tiny.py)")
flags.DEFINE_integer("vae_steps", 600, "VAE fitting steps")
flags.DEFINE_integer("vae_batch", 32, "VAE fitting batch")
flags.DEFINE_float("vae_lr", 5e-3, "VAE fitting peak learning rate")
flags.DEFINE_integer("num_train", 20000, "synthetic training records")
flags.DEFINE_integer("variants", 16, "renderings of each scene (nudged, resized, tinted; see data.synthetic)")
flags.DEFINE_integer("num_eval", 64, "held-out records per task to evaluate")
flags.DEFINE_integer("sample_steps", 20, "DDIM steps when generating")
flags.DEFINE_bool("resume", False, "continue a demo stopped during training (SIGTERM): its data, fitted VAE and newest "
                  "checkpoint in --workdir are reused")
FLAGS = flags.FLAGS


def evaluate(model, tokenizer, c, eval_path: Path, num_per_task: int, sample_steps: int, out_dir: Path,
             train_dir: Path) -> dict:
    """Understanding scored here on the model in memory; generation and editing through the sweep (`sweep_eval`)."""
    from genllava_jax import infer
    from genllava_jax.data.pipeline import Encoder
    from genllava_jax.data.records import as_dict, read_records
    from genllava_jax.data.tokenizer import SpecialIds

    ids = SpecialIds.of(tokenizer, c.data.num_img_tokens)
    encoder = Encoder(tokenizer, ids, eval_path.parent, c.data.max_len, c.data.image_size, c.data.num_patches,
                      c.data.target_image_size, c.data.on_too_long)
    by_task: dict[str, list] = {"i2t": [], "t2i": [], "edit": []}
    for raw in (as_dict(line) for _, line in read_records(eval_path)):
        if raw.get("task") in by_task and len(by_task[raw["task"]]) < num_per_task:
            by_task[raw["task"]].append(raw)
    stack = lambda rows: {k: np.stack([encoder(r)[k] for r in rows]) for k in encoder.blank()}
    out = {}

    rows = by_task["i2t"]
    tokens = infer.answer(model, stack(rows), max_new_tokens=8, eos_id=ids.eos, pad_id=ids.pad)
    answers = [tokenizer.decode([t for t in row if t not in (ids.eos, ids.pad)], skip_special_tokens=True).strip()
               for row in tokens]
    truth = [r["conversations"][1]["value"].strip() for r in rows]  # the prompt is the first question
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in rows]
    correct = [a == t for a, t in zip(answers, truth)]
    out["understanding_accuracy"] = float(np.mean(correct))
    out["understanding_by_question"] = by_question(questions, correct)
    examples = [f"  Q: {q}  A: {a!r}  (truth {t!r})" for q, a, t in list(zip(questions, answers, truth))[:4]]
    out.update(sweep_eval(c, train_dir, by_task["t2i"], by_task["edit"], eval_path.parent, sample_steps, out_dir))
    return out, examples


# the sweep's metrics the demo cannot have: their encoders' weights are not on this machine
LEFT_OUT = "CLIP score, FID, CLIP-FID, CLIP-I, DINO, CLIP-T: left out as the sweep leaves them out without --clip, " \
           "--inception, --dino weights (none on this machine)"


def sweep_eval(c, train_dir: Path, t2i_rows: list, edit_rows: list, data_dir: Path, sample_steps: int,
               out_dir: Path) -> dict:
    """Generation and editing as a user's sweep scores them: the held-out prompts written as a t2i prompt file,
    the held-out edits as a MagicBrush-style file (the world's PNGs), run by `sweep.run` on the trained checkpoint
    in two settings: `own` (the image only when the model ends its answer with [SOI]: soi_rate) and `forced`
    ([SOI][IMG..] forced after every answer, metrics named forced/...). Its metrics (soi_rate, images, l1, l2)
    become generation_* / editing_*; `synthetic.judge` then scores the images it saved: generation_accuracy etc.
    (own setting, an answer without [SOI] counts as wrong) and forced/generation_accuracy etc."""
    import jax

    from genllava_jax import infer, sweep
    from genllava_jax.data import synthetic
    from genllava_jax.evaluate import generation

    root = out_dir / "sweep"
    shutil.rmtree(root, ignore_errors=True)  # the sweep resumes finished cells: an earlier demo's would be reused
    root.mkdir(parents=True)
    rows = {"t2i": t2i_rows, "edit": edit_rows}
    files = {t: root / f"{t}.jsonl" for t, r in rows.items() if r}  # (a tiny demo's few held-out records may have none)
    if "t2i" in files:
        files["t2i"].write_text("".join(json.dumps({"id": r["id"], "prompt": r["conversations"][0]["value"]}) + "\n"
                                        for r in t2i_rows))
    if "edit" in files:
        files["edit"].write_text("".join(json.dumps({
            "id": r["id"], "source": r["image"], "target": r["target_image"], "caption": r["caption"],
            "instruction": r["conversations"][0]["value"].replace("<image>", "").strip()}) + "\n" for r in edit_rows))
    benchmarks = {t: sweep.Benchmark(t, (str(f),) if t == "t2i" else (str(f), str(data_dir))) for t, f in files.items()}
    own = infer.Settings(max_new_tokens=8, num_steps=sample_steps, guidance_scale=c.sample.guidance_scale,
                         sampler=c.sample.sampler)
    settings = {"own": own, "forced": dataclasses.replace(own, force_image=True)}
    n = jax.device_count()  # one batch per benchmark; the longest prompt + answer + [SOI][IMG..] fits the 2nd bucket
    batch = -(-max(map(len, rows.values())) // n) * n
    buckets = (c.data.max_len, c.data.max_len + own.max_new_tokens + c.data.num_img_tokens + 1)
    if benchmarks:
        sweep.run([str(train_dir)], list(benchmarks.values()), settings, root, batch_size=batch,
                  length_buckets=buckets)

    out = {}
    ckpt = sweep.Checkpoint(os.path.normpath(str(train_dir)), sweep.latest_step(train_dir))
    for task, key, name in (("t2i", "scene", "generation"), ("edit", "target", "editing")):
        if task not in benchmarks:
            continue
        want = {r["id"]: (r["meta"][key]["colour"], r["meta"][key]["kind"]) for r in rows[task]}
        items = generation.READERS[task](*benchmarks[task].files)
        for setting, s in settings.items():
            cell = sweep.Cell(ckpt, setting, s, benchmarks[task])
            prefix = "forced/" if s.force_image else ""
            done = json.loads(cell.path(root, ".done.json").read_text())
            for m, v in done["metrics"].items():
                if not (prefix and m == "soi_rate"):  # the same answers as own's: its soi_rate is own's
                    out[f"{prefix}{name}_{m.removeprefix('forced/')}"] = v
            recs = sweep.read_answer_records(cell.path(root, ".jsonl"))
            made = {it.question_id: recs[it.key]["metadata"].get("image") for it in items}
            images = {q: np.asarray(Image.open(cell.path(root, "_images") / f).convert("RGB"))
                      for q, f in made.items() if f}
            judged = {q: synthetic.judge(im) for q, im in images.items()}
            got = [judged.get(q, (None, None)) for q in want]  # no image: judged wrong
            out[f"{prefix}{name}_accuracy"] = float(np.mean([g == w for g, w in zip(got, want.values())]))
            out[f"{prefix}{name}_colour_accuracy"] = float(np.mean([g[0] == w[0] for g, w in zip(got, want.values())]))
            if not prefix and images:
                shown = [q for q in want if q in images][:32]
                save_grid(np.stack([images[q] for q in shown]), out_dir / f"{name}_samples.png")
                by_id = {r["id"]: r for r in rows[task]}
                (out_dir / f"{name}_samples.txt").write_text("\n".join(
                    f"{i}: {by_id[q]['conversations'][0]['value']}  -> judged {judged[q]}"
                    for i, q in enumerate(shown)))
    out["sweep"] = {"out": str(root), "results": str(root / "results.md"), "left_out": LEFT_OUT}
    return out


def by_question(questions: list[str], correct: list[bool]) -> dict[str, float]:
    """Accuracy per kind of question (colour, kind, position, ...): one number hides a part the model has not
    learned (position was 33 % while the overall score looked fine)."""
    hits: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct):
        hits.setdefault(q, []).append(ok)
    return {q: float(np.mean(h)) for q, h in sorted(hits.items())}


def save_grid(images, path, scale: int = 96):
    """A PNG grid of uint8 images, enlarged to about `scale` px per image (nearest neighbour: pixels stay pixels)."""
    from genllava_jax import infer

    grid = Image.fromarray(infer.image_grid(images))
    k = max(1, scale // images.shape[1])
    grid.resize((grid.width * k, grid.height * k), Image.NEAREST).save(path)


def reconstruction_accuracy(vae, eval_path: Path, size: int) -> float:
    """How often the judge names the right colour on the VAE's own reconstructions of held-out targets: the ceiling
    the fitted VAE puts on generation accuracy."""
    import jax

    from genllava_jax.data import synthetic
    from genllava_jax.data.records import as_dict, read_records
    from genllava_jax.vae_fit import load_images

    records = [as_dict(raw) for _, raw in read_records(eval_path)]
    names = sorted({r["target_image"] for r in records if r.get("target_image")})
    x = load_images(eval_path.parent, size, only=names)
    rec = np.asarray(jax.jit(lambda x: vae.decode(vae.encode(x)[0]))(x))
    rec = ((rec + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return float(np.mean([synthetic.judge(r)[0] == synthetic.scene_of(n).colour for r, n in zip(rec, names)]))


def main(_):
    import importlib.util

    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO

    import jax

    from genllava_jax import checkpoint, train
    from genllava_jax.atomic import atomic_write
    from genllava_jax.data import synthetic
    from genllava_jax.data.tokenizer import load_tokenizer
    from genllava_jax.models.vae import VAEConfig
    from genllava_jax.vae_fit import fit_vae, load_images

    work = Path(FLAGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent  # configs/ sits beside genllava_jax/ in a checkout, inside it when installed
    tiny_py = next(p for p in (here.parent / "configs" / "tiny.py", here / "configs" / "tiny.py") if p.exists())
    spec = importlib.util.spec_from_file_location("tiny", tiny_py)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    times = {}

    t0 = time.time()
    paths = {"train": work / "data" / "train.jsonl", "eval": work / "data" / "eval.jsonl",
             "images": work / "data" / "images", "tokenizer": work / "data" / "tokenizer"}
    reuse = FLAGS.resume and all(p.exists() for p in paths.values())
    if not reuse:
        paths = synthetic.make_synthetic(work / "data", num_train=FLAGS.num_train, num_eval=4 * FLAGS.num_eval,
                                         image_size=c.data.image_size, num_img_tokens=c.data.num_img_tokens,
                                         variants=FLAGS.variants)
    times["data_s"] = time.time() - t0
    took = "reused" if reuse else f"{times['data_s']:.0f} s"
    print(f"[1/5] synthetic world: {paths['train']} ({took})", flush=True)

    t0 = time.time()
    if FLAGS.resume and (work / "vae_metrics.json").exists():  # written after the VAE: both are there
        vae_metrics = json.loads((work / "vae_metrics.json").read_text())
    else:
        vae_cfg = VAEConfig(**c.model.vae.to_dict())
        # every image, held-out scenes included: the VAE is a pixel codec standing in for SD's, which was pretrained
        # on far more than any one data set; what is held out is text -> image and edits. Fitted on the training
        # scenes only, its reconstructions of held-out scenes were judged the right colour 30 % of the time (68 %
        # seen).
        vae, vae_metrics = fit_vae(vae_cfg, load_images(paths["images"], c.data.target_image_size),
                                   steps=FLAGS.vae_steps, lr=FLAGS.vae_lr, batch_size=FLAGS.vae_batch)
        vae_metrics["vae_reconstruction_colour_accuracy"] = reconstruction_accuracy(vae, paths["eval"],
                                                                                    c.data.target_image_size)
        checkpoint.save_module(work / "vae", vae, "vae", overwrite=True)
        with atomic_write(work / "vae_metrics.json") as tmp:
            tmp.write_text(json.dumps(vae_metrics, indent=2))
    times["vae_s"] = time.time() - t0
    print(f"[2/5] VAE fitted: reconstruction MSE {vae_metrics['vae_mse']:.4f}, judged colour of its held-out "
          f"reconstructions {vae_metrics['vae_reconstruction_colour_accuracy']:.1%}, latent scale "
          f"{vae_metrics['scaling_factor']:.3f} ({times['vae_s']:.0f} s)", flush=True)

    t0 = time.time()
    c.data.path, c.data.tokenizer = str(paths["train"]), str(paths["tokenizer"])
    c.init.vae = str(work / "vae")
    c.model.vae.scaling_factor = vae_metrics["scaling_factor"]
    if FLAGS.train_steps:
        c.train.steps = FLAGS.train_steps
    # a fresh run unless resuming: train.run resumes from any checkpoint in its workdir, and an earlier demo's was
    # trained on the previous VAE
    if not FLAGS.resume:
        shutil.rmtree(work / "train", ignore_errors=True)
    last = train.run(c, work / "train")
    times["train_s"] = time.time() - t0
    done = checkpoint.ocp.CheckpointManager((work / "train" / "checkpoints").absolute()).latest_step()
    if done != c.train.steps:  # preempted (SIGTERM): a checkpoint of the step it stopped at, no half-trained scores
        again = " ".join([sys.executable, "-m genllava_jax.demo", *(a for a in sys.argv[1:] if a != "--resume"),
                          "--resume"])
        print(f"[3/5] training stopped (SIGTERM) after step {done} of {c.train.steps}; its checkpoint is in "
              f"{work / 'train' / 'checkpoints'}. Nothing was evaluated. Resume with: {again}", flush=True)
        sys.exit(1)
    print(f"[3/5] trained {c.train.steps} steps: loss {last.get('loss', float('nan')):.3f} "
          f"({times['train_s']:.0f} s)", flush=True)

    t0 = time.time()
    model, _ = train.load_trained(work / "train")
    tokenizer = load_tokenizer(c.data.tokenizer, c.data.num_img_tokens)
    metrics, examples = evaluate(model, tokenizer, c, paths["eval"], FLAGS.num_eval, FLAGS.sample_steps, work,
                                work / "train")
    times["eval_s"] = time.time() - t0
    metrics.update({**vae_metrics, **{k: round(v, 1) for k, v in times.items()}, "train_steps": c.train.steps,
                    "devices": jax.device_count()})
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("[4/5] held-out evaluation:")
    print("\n".join(examples))
    print(f"  {'understanding_accuracy':28s} {metrics['understanding_accuracy']:.1%}")
    print("\n".join(f"    {q:34s} {v:.0%}" for q, v in metrics["understanding_by_question"].items()))
    print(f"  generation and editing through the sweep ({metrics['sweep']['results']}): own = the model's own [SOI], "
          f"forced = [SOI][IMG..] teacher-forced")
    print(f"  {'':28s} {'own':>7s} {'forced':>7s}")
    for k in ("generation_accuracy", "generation_colour_accuracy", "generation_soi_rate", "editing_accuracy",
              "editing_colour_accuracy", "editing_soi_rate", "editing_l1", "editing_l2"):
        fmt = (lambda v: f"{v:7.4f}") if k.endswith(("_l1", "_l2")) else (lambda v: f"{v:7.1%}")
        forced = metrics.get(f"forced/{k}")
        print(f"  {k:28s} {fmt(metrics[k]) if k in metrics else '      -'} {'' if forced is None else fmt(forced)}")
    print(f"  ({LEFT_OUT})")
    print(f"metrics: {work / 'metrics.json'}; samples: {work}/generation_samples.png, {work}/editing_samples.png")
    t0 = time.time()
    talk(model, tokenizer, c, paths["eval"], work)
    times["talk_s"] = time.time() - t0
    print(f"total {sum(times.values()) / 60:.1f} min")


def talk(model, tokenizer, c, eval_path: Path, work: Path) -> None:
    """[5/5] The assistant loop of genllava-chat / -generate / -edit on the demo model, on a held-out scene."""
    from genllava_jax import cli, infer
    from genllava_jax.data.records import as_dict, read_records

    assistant = infer.Assistant(model, tokenizer, c.data, length_buckets=(c.data.max_len,))
    settings = infer.Settings(max_new_tokens=12, num_steps=FLAGS.sample_steps, guidance_scale=c.sample.guidance_scale)
    record = next(r for r in (as_dict(raw) for _, raw in read_records(eval_path)) if r.get("task") == "edit")
    image = cli.open_image(eval_path.parent / record["image"])
    print(f"[5/5] the assistant (genllava-chat / -generate / -edit --workdir={work / 'train'}):")
    print(f"  chat about {record['image']}:")
    for reply, q in zip(cli.chat(assistant, image, ["What colour is the shape?", "What shape is it?"], settings,
                                 stream=False), ["What colour is the shape?", "What shape is it?"]):
        print(f"    > {q}\n    {reply.text}")
    prompt = "Draw a " + " ".join(record["meta"]["source"][k] for k in ("colour", "kind")) + "."
    print(f"  generate {prompt!r}: {cli.draw(assistant, prompt, None, settings, work / 'generate.png')}")
    instruction = record["conversations"][0]["value"].replace("<image>", "").strip()
    print(f"  edit {instruction!r}: {cli.draw(assistant, instruction, image, settings, work / 'edit.png')}")


if __name__ == "__main__":
    errors.run(main)
