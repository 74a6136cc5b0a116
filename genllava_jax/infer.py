"""Inference with the joint model: answers (understanding), images (generation, editing), and the assistant loop.

Three jitted pieces, each compiled once per (bucket shape, settings):
- `decode_arrays`: image patches spliced into the left-padded prompts, batched prefill + KV-cache decode in one
  `lax.while_loop` (greedy / temperature / top-p), per-row stop on `</s>` or `[SOI]`;
- `_images`: a sequence holding `[SOI][IMG0..N-1]` → LLM states → Q-former → guided sampler → VAE decode;
- `Assistant.reply` glues them: when a row's answer ends in `[SOI]`, its `[IMG]` tokens are appended (GILL's
  inference: the model emits `[SOI]`, the rest of the image tokens are forced) and its image is generated.
`answer`/`images` also take the pipeline's fixed-shape rows (`Encoder.example`), as the demo and train samples do.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genllava_jax import diffusion
from genllava_jax.constants import IGNORE
from genllava_jax.models import mistral

SAMPLERS = {"ddim": diffusion.DDIM, "euler": diffusion.EulerDiscrete}


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n: shapes come from a short list, so each bucket compiles once."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}; pass larger buckets")


def left_pad(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = np.full((len(rows), length), pad_id, np.int32), np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {b}: {len(row)} tokens > length {length}")
        ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
    return ids, mask


def prompts_of(batch: dict) -> list[list[int]]:
    """Each pipeline row's prompt: its tokens before the first label (the whole row if it has none)."""
    ids, labels, mask = (np.asarray(batch[k]) for k in ("input_ids", "labels", "attention_mask"))
    has = (labels != IGNORE).any(1)
    lengths = np.where(has, (labels != IGNORE).argmax(1), mask.sum(1))
    return [list(row[:n]) for row, n in zip(ids, lengths)]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "stop_ids", "pad_id",
                                             "temperature", "top_p", "on_token"))
def decode_arrays(graphdef, state, ids, mask, image, has_image, rng, **kw):
    """The jitted decode on a split model and device arrays; its outputs stay on the devices (global arrays across
    hosts, as a sweep gathers them). `decode` is the one-host convenience around it."""
    model = nnx.merge(graphdef, state)
    embeds = model.embed_inputs(ids, image, has_image)
    return mistral.decode(model.llm, mask, rng, inputs_embeds=embeds, **kw)


def decode(model, ids, mask, image, has_image, *, max_new_tokens: int = 16, eos_id: int | None = None,
           stop_ids: tuple = (), pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, rng=None,
           on_token=None) -> mistral.Decoded:
    """New tokens and per-row lengths after left-padded prompts (image patches spliced at `<image>`)."""
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    out = decode_arrays(graphdef, state, *map(jnp.asarray, (ids, mask, image, has_image)), rng,
                        max_new_tokens=max_new_tokens, eos_id=eos_id, stop_ids=tuple(stop_ids), pad_id=pad_id,
                        temperature=float(temperature), top_p=float(top_p), on_token=on_token)
    return mistral.Decoded(*jax.device_get(tuple(out)))


def answer(model, batch: dict, *, max_new_tokens: int = 16, eos_id: int | None = None, pad_id: int = 0,
           temperature: float = 0.0, top_p: float = 1.0, rng=None) -> np.ndarray:
    """New tokens (B, max_new_tokens) answering each pipeline row's prompt (greedy by default)."""
    ids, mask = left_pad(prompts_of(batch), np.asarray(batch["input_ids"]).shape[1], pad_id)
    return decode(model, ids, mask, batch["image"], batch["has_image"], max_new_tokens=max_new_tokens,
                  eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_p=top_p, rng=rng).tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "num_steps"))
def _images(graphdef, state, batch, rng, guidance_scale, image_guidance_scale, *, sampler, num_steps):
    model = nnx.merge(graphdef, state)
    cond = model.condition(batch["input_ids"], batch["attention_mask"], batch["image"], batch["has_image"])
    vae, unet = model.vae, model.unet
    size = unet.cfg.sample_size
    shape = (size, size, vae.cfg.latent_channels)
    if "noise" in batch:
        noise = batch["noise"]
    elif rng.ndim == 0:
        noise = jax.random.normal(rng, (cond.shape[0], *shape), jnp.float32)
    else:  # a key per row: each row's noise is what it would draw alone, whatever its batch
        noise = jax.vmap(lambda key: jax.random.normal(key, (1, *shape), jnp.float32)[0])(rng)
    null = model.null_cond[...]
    if model.cfg.edit_mode == "latent_concat":
        src = vae.latents(batch["source_image"])
        fn = diffusion.guided(unet, cond, null, guidance_scale, src, image_guidance_scale)
    else:
        fn = diffusion.guided(unet, cond, null, guidance_scale)
    latents = diffusion.sample_loop(fn, sampler, num_steps, noise)
    return jnp.clip(vae.decode_latents(latents), -1.0, 1.0)


def images(model, batch: dict, *, rng=None, num_steps: int = 50, guidance_scale: float = 7.5,
           image_guidance_scale: float = 1.5, sampler: str = "ddim") -> np.ndarray:
    """uint8 images (B, H, W, 3) generated from each row's [IMG] states (classifier-free guided).

    `batch` needs input_ids (with [IMG0..N-1] in each row), attention_mask, image, has_image; source_image
    (VAE pixels) for latent_concat editing; optionally noise (B, h, w, latent channels), the initial latents, in
    place of a draw from `rng` (e.g. one per record, so an image does not depend on its batch). `rng`: one key for
    the batch's noise, or a key per row (B,)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: choose one of {sorted(SAMPLERS)}")
    graphdef, state = nnx.split(model)
    B = np.asarray(batch["input_ids"]).shape[0]
    s = model.cfg.vae.sample_size
    x = {"source_image": np.zeros((B, s, s, 3), np.float32), **{k: batch[k] for k in (
        "input_ids", "attention_mask", "image", "has_image", "source_image", "noise") if k in batch}}
    out = _images(graphdef, state, on_model_devices(x, state),
                  jax.random.key(0) if rng is None else rng, jnp.float32(guidance_scale),
                  jnp.float32(image_guidance_scale), sampler=SAMPLERS[sampler](model.cfg.schedule),
                  num_steps=num_steps)
    return np.asarray((to_host(out) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def on_model_devices(batch: dict, state) -> dict:
    """Host arrays as jax arrays for a jitted call with the model's `state`. One process: the default device.
    Several: replicated over the model's mesh, which spans every host (each process passes the same rows)."""
    if jax.process_count() == 1:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    mesh = next(x.sharding.mesh for x in jax.tree.leaves(state) if isinstance(x.sharding, jax.NamedSharding))
    replicated = jax.NamedSharding(mesh, jax.P())
    return {k: jax.make_array_from_process_local_data(replicated, np.asarray(v)) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of `x` on this host, also when its shards live on other hosts' devices."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Decoding and sampling settings: one cell of a sweep's settings axis."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_steps: int = 25
    guidance_scale: float = 3.0
    image_guidance_scale: float = 1.5
    sampler: str = "ddim"
    seed: int = 0
    force_image: bool = False  # generation/editing: [SOI][IMG..] forced after every answer (teacher-forced)


@dataclasses.dataclass
class Reply:
    text: str
    tokens: list[int]
    image: np.ndarray | None = None  # uint8 (H, W, 3) when the answer asked for one ([SOI])


class Assistant:
    """Multi-turn assistant over a trained model: prompts through the Mistral template, answers, images."""

    def __init__(self, model, tokenizer, data_cfg, *, length_buckets=(64, 128, 256, 512, 1024, 2048, 4096)):
        from genllava_jax.data.tokenizer import SpecialIds

        self.model, self.tokenizer, self.data_cfg = model, tokenizer, data_cfg
        self.ids = SpecialIds.of(tokenizer, data_cfg.num_img_tokens)
        self.length_buckets = tuple(length_buckets)
        self.stream = None  # set to a callable(str) to receive text as it is decoded (batch of one)

    def prompt(self, history: list[tuple[str, str]], user: str, *, task: str, has_image: bool) -> list[int]:
        from genllava_jax.data.template import encode_prompt
        from genllava_jax.data.tokenizer import IMAGE

        if has_image and not history and IMAGE not in user:
            user = f"{IMAGE}\n{user}"
        return encode_prompt(self.tokenizer, self.ids, history, user, task=task,
                             num_patches=self.data_cfg.num_patches)

    def pixels(self, pil_images: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(SigLIP pixels, has_image, VAE pixels) for a batch of PIL images or None."""
        from genllava_jax.data.image import ImageConfig, preprocess
        from genllava_jax.data.pipeline import vae_pixels

        s, t = self.data_cfg.image_size, self.data_cfg.target_image_size
        sig, vae = np.zeros((len(pil_images), s, s, 3), np.float32), np.zeros((len(pil_images), t, t, 3), np.float32)
        for b, im in enumerate(pil_images):
            if im is not None:
                sig[b], vae[b] = preprocess(im, ImageConfig(size=(s, s))), vae_pixels(im, t)
        return sig, np.array([im is not None for im in pil_images]), vae

    def _on_token(self, step, tokens_B):
        """Streams each row's new text: its whole answer is re-decoded each step (a BPE piece alone may not be
        text). One bound method for every call, so the decode compiled with it is reused."""
        if step == 0:
            self._streamed, self._texts = [[] for _ in tokens_B], [""] * len(tokens_B)
        for b, tok in enumerate(tokens_B[:self._stream_rows]):
            if int(tok) in (self.ids.eos, self.ids.pad, self.ids.soi):
                continue
            self._streamed[b].append(int(tok))
            text = self.tokenizer.decode(self._streamed[b], skip_special_tokens=True)
            self._sink(b, text[len(self._texts[b]):])
            self._texts[b] = text

    def text(self, tokens) -> str:
        """An answer's text: its tokens without the stop token ([SOI] or </s>) and special tokens."""
        keep = [int(t) for t in tokens if int(t) not in (self.ids.eos, self.ids.soi)]
        return self.tokenizer.decode(keep, skip_special_tokens=True).strip()

    def reply(self, prompts: list[list[int]], pil_images: list, settings: Settings = Settings(), *,
              force_image: bool | list[bool] = False, seeds: list[int] | None = None, batch_size: int | None = None,
              on_text=None) -> list[Reply]:
        """Answers to a batch of prompts; rows whose answer ends in [SOI] (rows with `force_image`: all, or a
        flag per row) also get an image generated from their [IMG] states.

        seeds: each row's image seed (default settings.seed); a row's image depends on its seed alone, not on its
        batch. batch_size: both jitted calls get this many rows (copies of row 0 fill them), so that a server
        compiles one shape per length bucket. on_text(row, piece): each row's text as it is decoded (also
        `self.stream(piece)` for a batch of one)."""
        ids, n = self.ids, len(prompts)
        force = [force_image] * n if isinstance(force_image, bool) else list(force_image)
        seeds = [settings.seed] * n if seeds is None else list(seeds)
        fill = max(batch_size or n, n) - n
        prompts, pil_images = list(prompts) + [prompts[0]] * fill, list(pil_images) + [pil_images[0]] * fill
        sig, has_image, vae_px = self.pixels(pil_images)
        T = bucket(max(map(len, prompts)), self.length_buckets)
        x, mask = left_pad(prompts, T, ids.pad)
        if on_text is None and self.stream is not None and n == 1:
            on_text = lambda b, piece: self.stream(piece)  # noqa: E731
        self._sink, self._stream_rows = on_text, n
        out = decode(self.model, x, mask, sig, has_image, max_new_tokens=settings.max_new_tokens, eos_id=ids.eos,
                     stop_ids=(ids.soi,), pad_id=ids.pad, temperature=settings.temperature, top_p=settings.top_p,
                     rng=jax.random.key(settings.seed), on_token=None if on_text is None else self._on_token)
        replies, gen_rows = [], []
        for b, (toks, length) in enumerate(zip(out.tokens[:n], out.lengths[:n])):
            toks = [int(t) for t in toks[:length]]
            wants = bool(toks) and toks[-1] == ids.soi
            replies.append(Reply(self.text(toks), toks))
            if wants or force[b]:
                body = toks[:-1] if wants else [t for t in toks if t != ids.eos]
                gen_rows.append((b, prompts[b] + body + list(ids.generation)))
        if gen_rows:
            sel = [b for b, _ in gen_rows]
            pix = self.draw([r for _, r in gen_rows], sig[sel], has_image[sel], vae_px[sel], [seeds[b] for b in sel],
                            settings, batch_size=batch_size)
            for b, im in zip(sel, pix):
                replies[b].image = im
        return replies

    def draw(self, rows: list[list[int]], sig, has_image, vae_px, seeds: list[int], settings: Settings = Settings(),
             *, batch_size: int | None = None) -> np.ndarray:
        """uint8 images (len(rows), H, W, 3) from rows ending in [SOI][IMG0..N-1][EOI] (with their prompt's
        pixels), each row's noise from its own seed; padded to `batch_size` rows (copies of row 0)."""
        n = len(rows)
        pick = np.array(list(range(n)) + [0] * (max(batch_size or n, n) - n))
        rows = [rows[i] for i in pick]
        gx, gmask = left_pad(rows, bucket(max(map(len, rows)), self.length_buckets), self.ids.pad)
        keys = jnp.stack([jax.random.key(seeds[i]) for i in pick])
        batch = dict(input_ids=gx, attention_mask=gmask, image=np.asarray(sig)[pick],
                     has_image=np.asarray(has_image)[pick], source_image=np.asarray(vae_px)[pick])
        return images(self.model, batch, rng=keys, num_steps=settings.num_steps,
                      guidance_scale=settings.guidance_scale, image_guidance_scale=settings.image_guidance_scale,
                      sampler=settings.sampler)[:n]


def image_grid(images_BHWC: np.ndarray, cols: int = 8) -> np.ndarray:
    B, H, W, C = images_BHWC.shape
    rows = -(-B // cols)
    grid = np.full((rows * (H + 2), cols * (W + 2), C), 255, np.uint8)
    for i, im in enumerate(images_BHWC):
        r, c = divmod(i, cols)
        grid[r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = im
    return grid
