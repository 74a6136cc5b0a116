"""StableLLaVA-style data: the LLM writes an image prompt and a dialogue about that image, a text-to-image model
renders the prompt, and the pair is a GVIT `i2t` record.

Topics come from a file (one a line; `brainstorm` can have the LLM write one). Two ways to ask:
    reply    one request per topic; the reply is `Image: ...` then Question:/Answer: turns (`replies.parse_dialogue`)
    fields   one request per field: the image prompt, then each question and each answer in turn, every request
             seeing the dialogue so far; the structure is the pipeline's, so even an LLM that cannot keep a format
             gives records (fewer parse failures, more requests)
Rendering, batched and guided, one image per record from noise seeded by its id: the Stable Diffusion pipeline
(`genllava_jax.sd`) or GenLLaVA's own generation (`[T2I]` prompt -> [SOI][IMG..] -> Q-former -> sampler -> VAE).
Optional filters on the image: the CLIP score of image and prompt (`--clip`, `--clip_threshold`), or any judge
`judge(prompt, image) -> reason | None` (the demo's is the synthetic world's pixel judge). Images go to
`<out stem>_images/<id>.png` beside the output; records name them relative to it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from genllava_jax import errors, infer
from genllava_jax.atomic import atomic_write
from genllava_jax.datagen import replies
from genllava_jax.datagen.llava import conversations, relative
from genllava_jax.datagen.llm import ChatLLM, seed_of
from genllava_jax.datagen.output import Output
from genllava_jax.datagen.prompts import FieldsPrompt, Prompt

IMAGE_REASONS = ("clip_score",)  # beyond replies.REASONS; a judge adds its own


def read_topics(path) -> list[tuple[str, str]]:
    """(id, topic) for each non-blank line not starting with #, duplicates dropped; the id hashes the text, so
    editing the file keeps the other topics' ids."""
    path = Path(path)
    if not path.is_file():
        raise errors.MissingFile(f"--topics={path}: no such file")
    seen, out = set(), []
    for line in path.read_text().splitlines():
        topic = " ".join(line.split())
        if topic and not topic.startswith("#") and topic not in seen:
            seen.add(topic)
            out.append((f"sl-{hashlib.sha1(topic.encode()).hexdigest()[:12]}", topic))
    if not out:
        raise errors.BadValue(f"--topics={path}: no topics (one a line)")
    return out


def _noise(seed: int, keys: Sequence[str], shape: tuple[int, ...]) -> np.ndarray:
    """(B, *shape) standard normal, each row from its own key: an image does not depend on its batch."""
    base = jax.random.key(seed)
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(base, seed_of(k)), shape, jnp.float32))
                     for k in keys])


def _padded(items: list, size: int) -> list:
    return items + [items[-1]] * (size - len(items))


class SDRenderer:
    """Stable Diffusion text-to-image (`sd.text_to_image`) on full batches (one compile)."""

    def __init__(self, pipe, *, batch_size: int = 8, num_steps: int = 50, guidance_scale: float = 7.5,
                 sampler: str = "ddim", size: int | None = None, negative_prompt: str = "", seed: int = 0):
        self.pipe, self.batch_size, self.seed = pipe, batch_size, seed
        self.kw = dict(num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler, height=size, width=size,
                       negative_prompts=negative_prompt)
        s = (size or pipe.default_size) // pipe.vae_scale_factor
        self.latent_shape = (s, s, pipe.models.unet.cfg.in_channels)

    def __call__(self, prompts: Sequence[str], keys: Sequence[str]) -> list[np.ndarray]:
        from genllava_jax import sd

        out = []
        for s in range(0, len(prompts), self.batch_size):
            p, k = _padded(list(prompts[s:s + self.batch_size]), self.batch_size), \
                _padded(list(keys[s:s + self.batch_size]), self.batch_size)
            images = sd.text_to_image(self.pipe, p, latents=_noise(self.seed, k, self.latent_shape), **self.kw)
            out += list(images[:min(self.batch_size, len(prompts) - s)])
        return out


class GenLLaVARenderer:
    """GenLLaVA's own generation: `template.format(prompt)` as a [T2I] request, [SOI][IMG0..N-1][EOI] forced after
    it, their states through the Q-former, the guided sampler and the VAE (`infer.images`), on full batches."""

    def __init__(self, assistant: infer.Assistant, *, batch_size: int = 8, num_steps: int = 25,
                 guidance_scale: float = 3.0, sampler: str = "ddim", template: str = "{}", seed: int = 0):
        self.a, self.batch_size, self.template, self.seed = assistant, batch_size, template, seed
        self.kw = dict(num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler)
        cfg = assistant.model.cfg
        self.latent_shape = (cfg.unet.sample_size, cfg.unet.sample_size, cfg.vae.latent_channels)

    def __call__(self, prompts: Sequence[str], keys: Sequence[str]) -> list[np.ndarray]:
        a, ids, out = self.a, self.a.ids, []
        for s in range(0, len(prompts), self.batch_size):
            p, k = _padded(list(prompts[s:s + self.batch_size]), self.batch_size), \
                _padded(list(keys[s:s + self.batch_size]), self.batch_size)
            rows = [a.prompt([], self.template.format(x), task="t2i", has_image=False) + list(ids.generation)
                    for x in p]
            x, mask = infer.left_pad(rows, infer.bucket(max(map(len, rows)), a.length_buckets), ids.pad)
            n = a.data_cfg.image_size
            batch = dict(input_ids=x, attention_mask=mask, image=np.zeros((len(p), n, n, 3), np.float32),
                         has_image=np.zeros(len(p), bool), noise=_noise(self.seed, k, self.latent_shape))
            out += list(infer.images(a.model, batch, **self.kw)[:min(self.batch_size, len(prompts) - s)])
        return out


class ClipFilter:
    """Rejects an image whose CLIP score against its prompt (100 cos, as the CLIP score) is below `threshold`."""

    def __init__(self, encoders, threshold: float):
        self.enc, self.threshold = encoders, threshold

    def scores(self, prompts: Sequence[str], images: Sequence[np.ndarray]) -> np.ndarray:
        from PIL import Image

        from genllava_jax.evaluate import image_metrics

        return image_metrics.clip_scores(self.enc.clip_images([Image.fromarray(im) for im in images]),
                                         self.enc.clip_texts(list(prompts)))


def _dialogue(turns) -> str:
    return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in turns)


def _ask_reply(llm: ChatLLM, prompt: Prompt, topics, out: Output, bar) -> dict:
    """id -> (image prompt, turns) for the topics whose one structured reply passes; the rest rejected."""
    comps = llm.complete([prompt.request(i, topic=t) for i, t in topics], on_batch=bar.update)
    ok = {}
    for (i, _), c in zip(topics, comps):
        try:
            ok[i] = replies.read("dialogue", c.text, c.finished, prompt.max_words)
        except replies.Rejected as r:
            out.reject(i, r.reason, str(r), c.text)
    return ok


def _ask_fields(llm: ChatLLM, prompt: FieldsPrompt, topics, out: Output, bar) -> dict:
    """id -> (image prompt, turns), each field its own request; a record leaves at its first rejected field."""
    topic = dict(topics)
    state: dict[str, dict] = {i: {"turns": [], "said": []} for i, _ in topics}

    def ask(part: Prompt, field: str, values, turn: int = 0) -> None:
        alive = list(state)  # each request its own key (so its own sampling), the turn included
        comps = llm.complete([part.request(f"{i}/{field}{turn}", topic=topic[i], **values(i)) for i in alive])
        for i, c in zip(alive, comps):
            state[i]["said"].append(c.text)
            try:
                state[i][field] = replies.read("text", c.text, c.finished, part.max_words)
            except replies.Rejected as r:
                out.reject(i, r.reason, f"{field}: {r}", state.pop(i)["said"])

    ask(prompt.image_prompt, "image_prompt", lambda i: {})
    for t in range(prompt.turns):
        ask(prompt.question, "question", lambda i: dict(image_prompt=state[i]["image_prompt"],
                                                        dialogue=_dialogue(state[i]["turns"])), t)
        ask(prompt.answer, "answer", lambda i: dict(image_prompt=state[i]["image_prompt"],
                                                    dialogue=_dialogue(state[i]["turns"]),
                                                    question=state[i]["question"]), t)
        for s in state.values():
            s["turns"].append((s.pop("question"), s.pop("answer")))
    ok = {}
    for i, s in state.items():
        try:
            replies.check(s["turns"], max_words=prompt.max_words, extra=(s["image_prompt"],))
            ok[i] = (s["image_prompt"], s["turns"])
        except replies.Rejected as r:
            out.reject(i, r.reason, str(r), s["said"])
    bar.update(len(topics))
    return ok


def make(topics: Sequence[tuple[str, str]], llm: ChatLLM, prompt: Prompt | FieldsPrompt, render: Callable, out: Output,
         *, chunk: int = 0, clip: ClipFilter | None = None, judge: Callable | None = None,
         progress: bool = True) -> dict:
    """Writes a record for every topic not yet in `out` (see the module docstring); returns the shard's report."""
    images_dir = out.base_dir / f"{out.path.stem}_images"
    todo = [t for t in topics if t[0] not in out.done]
    chunk = chunk or 8 * llm.batch_size
    bar = tqdm(total=len(topics), initial=len(topics) - len(todo), desc=f"stablellava {out.path.name}",
               unit="rec", disable=not progress, file=sys.stderr)
    for s in range(0, len(todo), chunk):
        part = todo[s:s + chunk]
        asked = (_ask_fields if isinstance(prompt, FieldsPrompt) else _ask_reply)(llm, prompt, part, out, bar)
        ids = [i for i, _ in part if i in asked]
        if not ids:
            continue
        prompts = [asked[i][0] for i in ids]
        images = render(prompts, ids)
        scores = clip.scores(prompts, images) if clip is not None else [None] * len(ids)
        topic = dict(part)
        for i, p, im, score in zip(ids, prompts, images, scores):
            said = {"image_prompt": p, "turns": asked[i][1]}
            if score is not None and score < clip.threshold:
                out.reject(i, "clip_score", f"{score:.2f} < {clip.threshold}", said)
                continue
            if judge is not None and (reason := judge(p, im)):
                out.reject(i, reason, "the judge", said)
                continue
            path = images_dir / f"{i}.png"
            _write_png(path, im)
            meta = {"source": "stablellava", "topic": topic[i], "image_prompt": p}
            if score is not None:
                meta["clip_score"] = round(float(score), 3)
            out.keep({"id": i, "task": "i2t", "image": relative(path, out.base_dir),
                      "conversations": conversations(asked[i][1]), "meta": meta})
        report = out.checkpoint()
        bar.set_postfix(kept=report["kept"], filtered=report["total"] - report["kept"])
    bar.close()
    return out.checkpoint()


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def brainstorm(llm: ChatLLM, prompt: Prompt, n: int, *, per_request: int = 20) -> list[str]:
    """Up to n distinct topics: requests of the prompt (its user template may name {count} and {index}), one topic a
    line of each reply (numbering and bullets dropped), in request order."""
    topics, seen, k = [], set(), 0
    while len(topics) < n and k < 4 * (n // per_request + 1):  # bounded: an LLM that repeats itself ends the loop
        batch = range(k, k + llm.batch_size)
        comps = llm.complete([prompt.request(f"brainstorm/{j}", count=per_request, index=j) for j in batch])
        for c in comps:
            for line in c.text.splitlines():
                t = " ".join(replies.parse_field(line.lstrip("0123456789.)-*• ")).split())
                if t and t.lower() not in seen and not replies.repetitive(t):
                    seen.add(t.lower())
                    topics.append(t)
        k += llm.batch_size
    return topics[:n]
