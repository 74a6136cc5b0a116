"""python -m genllava_jax.datagen {llava,stablellava,brainstorm,edit} ...: see genllava_jax/datagen/__init__.py."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from genllava_jax import errors


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the output .jsonl (shards: OUT-00000-of-0000N.jsonl)")
    p.add_argument("--shard", type=int, default=None, help="this process's shard (default: its JAX process index)")
    p.add_argument("--num_shards", type=int, default=None, help="shards in all (default: the JAX process count)")
    p.add_argument("--arrayrecord", action="store_true", help="also write the kept records as .arrayrecord at the end")
    p.add_argument("--image_root", default=None, help="with --arrayrecord: the folder images must lie in (default: "
                                                      "the output's; needed when they lie outside it)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def _llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", required=True, help="a converted Mistral (python -m convert mistral), a Hugging Face "
                                               "Mistral folder, or a GenLLaVA training workdir")
    p.add_argument("--tokenizer", default=None, help="the LLM's Hugging Face tokenizer folder (default: --llm)")
    p.add_argument("--mesh", default="data=-1", help="mesh over this process's devices, e.g. data=-1 or fsdp=8")
    p.add_argument("--batch_size", type=int, default=0, help="decode batch (default: 8 per data-parallel device)")
    p.add_argument("--length_buckets", default="128,256,512,1024,2048,4096", help="prompt length buckets")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="the run's seed; each record samples with seed + its id")
    p.add_argument("--chunk", type=int, default=0, help="records per write-out (default: 8 batches)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genllava_jax.datagen", description=sys.modules[
        "genllava_jax.datagen"].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    errors.add_verbose(p)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("llava", help="conversations, descriptions, reasoning from COCO captions + boxes")
    _output_args(a)
    _llm_args(a)
    a.add_argument("--captions", default=None, help="COCO captions JSON")
    a.add_argument("--instances", default=None, help="COCO instances JSON (boxes)")
    a.add_argument("--images", required=True, help="the image folder (file_name is relative to it)")
    a.add_argument("--prompts", default=None, help="a folder of prompt .toml files or a comma list of them "
                                                  "(default: configs/datagen/llava)")
    a.add_argument("--limit", type=int, default=0, help="the first N images only")

    s = sub.add_parser("stablellava", help="LLM-written image prompt + dialogue, rendered by SD or GenLLaVA")
    _output_args(s)
    _llm_args(s)
    s.add_argument("--topics", required=True, help="a text file, one topic a line (see brainstorm)")
    s.add_argument("--prompt", default=None, help="a dialogue or fields prompt file "
                                                 "(default: configs/datagen/stablellava/dialogue.toml)")
    s.add_argument("--sd", default=None, help="render with this Stable Diffusion folder (converted or diffusers)")
    s.add_argument("--genllava", default=None, help="render with this GenLLaVA training workdir (default: --llm "
                                                   "when it is one and --sd is not given)")
    s.add_argument("--render_template", default="{}", help="GenLLaVA rendering: the [T2I] request around the prompt")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--sampler", default="ddim", choices=("ddim", "euler"))
    s.add_argument("--size", type=int, default=None, help="SD: pixels (default: the model's)")
    s.add_argument("--negative_prompt", default="")
    s.add_argument("--render_batch", type=int, default=8)
    s.add_argument("--clip", default=None, help="a transformers CLIP folder: filter by the CLIP score")
    s.add_argument("--clip_threshold", type=float, default=25.0, help="the least CLIP score (100 cos) kept")
    s.add_argument("--limit", type=int, default=0, help="the first N topics only")

    b = sub.add_parser("brainstorm", help="the LLM lists topics for stablellava")
    b.add_argument("--out", required=True, help="the topics .txt to write")
    b.add_argument("--n", type=int, default=1000, help="topics wanted")
    b.add_argument("--prompt", default=None, help="default: configs/datagen/stablellava/brainstorm.toml")
    _llm_args(b)

    e = sub.add_parser("edit", help="editing triplets -> GVIT edit, or text-image pairs -> GVIT t2i")
    _output_args(e)
    e.add_argument("--kind", required=True, choices=("edit", "t2i"))
    e.add_argument("--src", required=True, help="the triplets / pairs (file or folder; see the docstring)")
    e.add_argument("--images", default=None, help="the folder image paths are relative to (default: --src's)")
    e.add_argument("--per_image", type=int, default=1, help="t2i from COCO captions: captions per image")
    e.add_argument("--templates", default=None, help="default: configs/datagen/edit_templates.toml")
    return p


def _digest(paths) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def _shard(a) -> tuple[int, int]:
    import jax

    n = a.num_shards if a.num_shards is not None else jax.process_count()
    i = a.shard if a.shard is not None else (jax.process_index() if a.num_shards is None else None)
    if i is None:
        raise errors.BadValue("--num_shards needs --shard (this process's index)")
    return i, n


def _llm(a):
    from genllava_jax.datagen import llm

    buckets = [int(x) for x in a.length_buckets.split(",") if x.strip()]
    return llm.load(a.llm, tokenizer=a.tokenizer, mesh=llm.local_mesh(a.mesh), batch_size=a.batch_size,
                    length_buckets=buckets, temperature=a.temperature, top_p=a.top_p, seed=a.seed)


def _llm_spec(a) -> dict:
    return {"llm": str(Path(a.llm).resolve()), "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed}


def _prompt_files(spec, default: Path) -> list[Path]:
    if spec is None:
        return sorted(default.glob("*.toml"))
    p = Path(spec)
    files = sorted(p.glob("*.toml")) if p.is_dir() else [Path(x) for x in spec.split(",") if x]
    if not files:
        raise errors.BadValue(f"--prompts={spec}: no .toml prompt files")
    return files


def _finish(out, a, report) -> int:
    out.close(arrayrecord=a.arrayrecord, image_root=a.image_root)
    print(f"{out.path}: kept {report['kept']} of {report['total']}; filtered: {report['filtered'] or 'none'}")
    return 0


def _llava(a) -> int:
    from genllava_jax.datagen import coco, llava, llm, output, prompts

    files = _prompt_files(a.prompts, prompts.default_dir() / "llava")
    ps = {f.stem: prompts.load(f, {"context"}) for f in files}
    entries = coco.read(a.captions, a.instances)
    entries = entries[:a.limit] if a.limit else entries
    shard, n = _shard(a)
    llm.check(a.llm, a.tokenizer)  # a wrong folder fails before the output is started
    spec = {"command": "llava", **_llm_spec(a), "captions": a.captions, "instances": a.instances,
            "images": str(Path(a.images).resolve()), "prompts": {f.stem: _digest([f]) for f in files},
            "limit": a.limit}
    out = output.Output(a.out, spec, shard, n)
    chat, _ = _llm(a)
    report = llava.make(output.shard_of(entries, shard, n), a.images, chat, ps, out, chunk=a.chunk,
                        progress=not a.no_progress)
    return _finish(out, a, report)


def _stablellava(a) -> int:
    from genllava_jax.datagen import llm, output, prompts, stablellava as sl

    path = Path(a.prompt) if a.prompt else prompts.default_dir() / "stablellava" / "dialogue.toml"
    import tomllib

    fields = "image_prompt" in tomllib.loads(path.read_text()) if path.is_file() else False
    prompt = prompts.load_fields(path) if fields else prompts.load(path, {"topic"})
    if not fields and prompt.kind != "dialogue":
        raise errors.BadValue(f"--prompt={path}: kind={prompt.kind!r}; stablellava needs a dialogue or fields file")
    topics = sl.read_topics(a.topics)
    topics = topics[:a.limit] if a.limit else topics
    shard, n = _shard(a)
    if a.sd and a.genllava:
        raise errors.BadValue("--sd and --genllava: render with one of them")
    llm.check(a.llm, a.tokenizer)  # a wrong folder fails before the output is started
    if not a.sd and not a.genllava and (Path(a.llm) / "checkpoints").is_dir():
        a.genllava = a.llm  # the LLM's own GenLLaVA renders
    if not a.sd and not a.genllava:
        raise errors.BadValue("stablellava renders with --sd=FOLDER or --genllava=WORKDIR (or an --llm workdir)")
    for flag, folder in (("sd", a.sd), ("genllava", a.genllava), ("clip", a.clip)):  # before the output is started
        if folder and not Path(folder).is_dir():
            raise errors.MissingFile(f"--{flag}={folder}: no such folder")
    if a.genllava and not (Path(a.genllava) / "checkpoints").is_dir():
        raise errors.MissingFile(f"--genllava={a.genllava}: not a training workdir (no checkpoints/)")
    spec = {"command": "stablellava", **_llm_spec(a), "topics": _digest([a.topics]), "prompt": _digest([path]),
            "sd": a.sd and str(Path(a.sd).resolve()), "genllava": a.genllava and str(Path(a.genllava).resolve()),
            "render_template": a.render_template, "steps": a.steps, "guidance": a.guidance, "sampler": a.sampler,
            "size": a.size, "negative_prompt": a.negative_prompt, "clip": a.clip,
            "clip_threshold": a.clip_threshold if a.clip else None, "limit": a.limit}
    out = output.Output(a.out, spec, shard, n)
    chat, own = _llm(a)
    render = renderer(a, chat, own)
    clip = None
    if a.clip:
        from genllava_jax.evaluate import generation

        clip = sl.ClipFilter(generation.Encoders.load(clip=a.clip), a.clip_threshold)
    report = sl.make(output.shard_of(topics, shard, n), chat, prompt, render, out, chunk=a.chunk, clip=clip,
                     progress=not a.no_progress)
    return _finish(out, a, report)


def renderer(a, chat, own):
    """The SD pipeline (--sd) or GenLLaVA's generation (--genllava, or the --llm workdir itself)."""
    from genllava_jax.datagen import stablellava as sl

    kw = dict(batch_size=a.render_batch, num_steps=a.steps, guidance_scale=a.guidance, sampler=a.sampler, seed=a.seed)
    if a.sd:
        from genllava_jax import sd

        return sl.SDRenderer(sd.load(a.sd, chat.mesh), size=a.size, negative_prompt=a.negative_prompt, **kw)
    if a.genllava and (own is None or Path(a.genllava).resolve() != Path(a.llm).resolve()):
        from genllava_jax import cli

        own = cli.load_assistant(a.genllava, chat.mesh)[0]
    return sl.GenLLaVARenderer(own, template=a.render_template, **kw)


def _brainstorm(a) -> int:
    from genllava_jax.atomic import atomic_write
    from genllava_jax.datagen import prompts, stablellava as sl

    path = Path(a.prompt) if a.prompt else prompts.default_dir() / "stablellava" / "brainstorm.toml"
    prompt = prompts.load(path, {"count", "index"})
    topics = sl.brainstorm(_llm(a)[0], prompt, a.n)
    with atomic_write(a.out) as tmp:
        tmp.write_text("".join(t + "\n" for t in topics))
    print(f"{a.out}: {len(topics)} topics")
    return 0


def _edit(a) -> int:
    from genllava_jax.datagen import edit, output, prompts

    templates_path = Path(a.templates) if a.templates else prompts.default_dir() / "edit_templates.toml"
    templates = edit.load_templates(templates_path)
    rows = edit.read_triplets(a.src, a.images) if a.kind == "edit" else edit.read_pairs(a.src, a.images, a.per_image)
    shard, n = _shard(a)
    spec = {"command": "edit", "kind": a.kind, "src": str(Path(a.src).resolve()), "templates": _digest(
        [templates_path]), "per_image": a.per_image}
    out = output.Output(a.out, spec, shard, n)
    report = edit.make(a.kind, output.shard_of(rows, shard, n), templates, out, progress=not a.no_progress)
    return _finish(out, a, report)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    from genllava_jax import distributed

    distributed.initialize()  # a multi-host run: each process writes its own shard on its own devices
    return {"llava": _llava, "stablellava": _stablellava, "brainstorm": _brainstorm, "edit": _edit}[a.command](a)


def cli() -> None:
    sys.exit(errors.guard(main))


if __name__ == "__main__":
    cli()
