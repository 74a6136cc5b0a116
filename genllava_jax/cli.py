"""The assistant from a training workdir (its newest checkpoint): chat, generate, edit.

    genllava-chat     --workdir=runs/demo/train --image=runs/demo/data/images/x.png --question="What colour is it?"
    genllava-generate --workdir=runs/demo/train --prompt="Draw a red circle." --out=red_circle.png
    genllava-edit     --workdir=runs/demo/train --image=in.png --instruction="Make it blue." --out=blue.png

chat streams the answer as it is decoded; without --question it reads questions from stdin until an empty line,
keeping the conversation. An answer that ends in [SOI] gets its image written to --out (numbered per turn).
generate and edit force the image tokens after the answer if the model did not emit [SOI] itself, and say so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from genllava_jax import errors


def load_assistant(workdir, mesh=None, length_buckets=None):
    """(infer.Assistant on the newest checkpoint of a training workdir, its config); with a mesh, params are
    restored straight into the rules' shardings on it (one device by default)."""
    import ml_collections

    from genllava_jax import infer, train
    from genllava_jax.data.tokenizer import load_tokenizer

    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise errors.MissingFile(f"{workdir}: no config.json; pass the --workdir of a training run")
    c = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    tok_dir = Path(c.data.tokenizer)
    if not tok_dir.exists():
        raise errors.MissingFile(f"{tok_dir}: the run's tokenizer (data.tokenizer in {workdir / 'config.json'}) is "
                                 f"gone")
    model, _ = train.load_trained(workdir, mesh)
    kw = {} if length_buckets is None else {"length_buckets": tuple(length_buckets)}
    return infer.Assistant(model, load_tokenizer(str(tok_dir), c.data.num_img_tokens), c.data, **kw), c


def define_flags():
    """The CLIs' flags, defined only when one runs (the demo and tests call the functions below directly)."""
    flags.DEFINE_string("workdir", None, "training workdir (checkpoints/, config.json, model_config.json)")
    flags.DEFINE_string("image", None, "input image (chat, edit)")
    flags.DEFINE_multi_string("question", [], "chat: questions, one per turn (default: read stdin)")
    flags.DEFINE_string("prompt", None, "generate: what to draw")
    flags.DEFINE_string("instruction", None, "edit: what to change")
    flags.DEFINE_string("out", "out.png", "where generated images go")
    flags.DEFINE_integer("max_new_tokens", 64, "answer length limit")
    flags.DEFINE_float("temperature", 0.0, "0 is greedy")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (with temperature > 0)")
    flags.DEFINE_integer("seed", 0, "sampling seed (text and image)")
    flags.DEFINE_integer("steps", 25, "diffusion sampling steps")
    flags.DEFINE_float("guidance", 3.0, "classifier-free guidance scale")
    flags.DEFINE_float("image_guidance", 1.5, "image guidance scale (latent_concat editing)")
    flags.DEFINE_enum("scheduler", "ddim", ["ddim", "euler"], "diffusion sampler")


def settings_from_flags():
    from genllava_jax.infer import Settings

    F = flags.FLAGS
    return Settings(max_new_tokens=F.max_new_tokens, temperature=F.temperature, top_p=F.top_p, num_steps=F.steps,
                    guidance_scale=F.guidance, image_guidance_scale=F.image_guidance, sampler=F.scheduler, seed=F.seed)


def open_image(path):
    from genllava_jax.data.records import BadRecord, load_image

    try:
        return None if path is None else load_image(str(path)).convert("RGB")
    except BadRecord as e:  # missing, corrupt, too large, ...
        raise errors.BadValue(f"--image={path}: {e}") from None


def save(image, path) -> str:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return str(path)


def chat(assistant, image, questions, settings, out="out.png", stream=True) -> list:
    """Answers questions in one conversation about `image` (or none); returns the replies."""
    if stream:
        assistant.stream = lambda text: print(text, end="", flush=True)
    history, replies = [], []
    for turn, question in enumerate(questions):
        prompt = assistant.prompt(history, question, task="i2t" if image is not None else "text",
                                  has_image=image is not None)
        reply = assistant.reply([prompt], [image], settings)[0]
        print() if stream else None
        if reply.image is not None:
            out_t = Path(out)
            print(f"[image] {save(reply.image, out_t.with_stem(f'{out_t.stem}_{turn}'))}")
        history.append((f"<image>\n{question}" if image is not None and not history else question, reply.text))
        replies.append(reply)
    assistant.stream = None
    return replies


def draw(assistant, text, image, settings, out):
    """generate (image None) or edit: the answer's image, with the image tokens forced if the model gave none."""
    prompt = assistant.prompt([], text, task="t2i" if image is None else "edit", has_image=image is not None)
    reply = assistant.reply([prompt], [image], settings, force_image=True)[0]
    if reply.tokens[-1:] != [assistant.ids.soi]:
        print(f"note: the model answered {reply.text!r} without [SOI]; the image tokens were forced", file=sys.stderr)
    return save(reply.image, out)


def _chat(argv):
    del argv
    F = flags.FLAGS
    assistant, _ = load_assistant(F.workdir)
    questions = F.question or iter(lambda: input("> ").strip(), "")
    chat(assistant, open_image(F.image), questions, settings_from_flags(), F.out)


def _generate(argv):
    del argv
    F = flags.FLAGS
    if not F.prompt:
        raise app.UsageError("--prompt is required")
    print(draw(load_assistant(F.workdir)[0], F.prompt, None, settings_from_flags(), F.out))


def _edit(argv):
    del argv
    F = flags.FLAGS
    if not (F.image and F.instruction):
        raise app.UsageError("--image and --instruction are required")
    print(draw(load_assistant(F.workdir)[0], F.instruction, open_image(F.image), settings_from_flags(), F.out))


def main_chat():
    define_flags()
    errors.run(_chat)


def main_generate():
    define_flags()
    errors.run(_generate)


def main_edit():
    define_flags()
    errors.run(_edit)
