"""The chat LLM that writes the data, and batched jitted decoding of many requests.

The LLM is a Mistral: our converted folder (`python -m convert mistral`), a Hugging Face Mistral folder (converted
in memory), or the LLM of a GenLLaVA training workdir (its newest checkpoint and its tokenizer). Prompts use the
Mistral-Instruct template (`data.template`; a system message goes at the head of the first user turn, in-context
examples are earlier turns).

Decoding is `models.mistral.decode` under one `jax.jit`: requests are grouped by prompt-length bucket and cut into
batches of a fixed size (the last one padded by repeating a row), so each (bucket, max_new_tokens) compiles once.
Every request samples with its own key, derived from the run's seed and its name, so its reply does not depend on
the batch it lands in: a resumed or re-sharded run writes the same text. The batch is split over this process's
devices (a mesh over `jax.local_devices()`; parameters placed by the sharding rules), so each process of a
multi-host run works alone on its shard.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from genllava_jax import errors, infer, sharding as shd
from genllava_jax.models import mistral

DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Request:
    key: str  # names the request: seeds its sampling
    turns: tuple[tuple[str, str], ...]  # earlier (user, assistant) turns: the in-context examples
    user: str  # the turn to answer
    max_new_tokens: int
    system: str = ""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finished: bool  # ended with </s>, not cut at max_new_tokens
    num_tokens: int


def seed_of(key: str) -> int:
    """A request's 31-bit seed from its name (stable across processes and Python runs, unlike hash())."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "little") & 0x7FFFFFFF


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id", "temperature",
                                             "top_p"))
def _decode(graphdef, state, ids_BT, mask_BT, seed, row_seeds_B, **kw):
    keys_B = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(seed), s))(row_seeds_B)
    out = mistral.decode(nnx.merge(graphdef, state), mask_BT, keys_B, input_ids=ids_BT, **kw)
    return out.tokens, out.lengths


class ChatLLM:
    """`complete(requests)`: replies to chat requests, batched and jitted; see the module docstring."""

    def __init__(self, model: mistral.Mistral, tokenizer, *, mesh=None, batch_size: int = 0,
                 length_buckets: Sequence[int] = DEFAULT_BUCKETS, temperature: float = 0.7, top_p: float = 0.9,
                 seed: int = 0):
        from genllava_jax.data.tokenizer import SpecialIds

        self.model, self.tokenizer = model, tokenizer
        self.mesh = mesh or next(iter(_meshes(model)), None) or shd.make_mesh({"data": 1}, jax.local_devices()[:1])
        rows = _batch_rows(self.mesh)
        self.batch_size = batch_size or 8 * rows
        if self.batch_size % rows:
            raise errors.BadValue(f"batch_size={self.batch_size} must be a multiple of the {rows} data-parallel "
                                  f"devices")
        self.ids = SpecialIds.of(tokenizer, _num_img_tokens(tokenizer))
        self.length_buckets = tuple(sorted(length_buckets))
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.graphdef, self.state = nnx.split(model)
        self.shapes: set[tuple[int, int]] = set()  # (prompt bucket, max_new_tokens) decoded so far

    def encode(self, r: Request) -> list[int]:
        """The request's prompt ids in the Mistral-Instruct template."""
        from genllava_jax.data.template import encode_prompt

        turns = [(u, a) for u, a in r.turns] + [(r.user, None)]
        if r.system:  # Mistral has no system role: it leads the first user turn
            turns[0] = (f"{r.system.strip()}\n\n{turns[0][0]}", turns[0][1])
        history, (user, _) = turns[:-1], turns[-1]
        ids = encode_prompt(self.tokenizer, self.ids, history, user, task="text", num_patches=0)
        vocab = self.model.cfg.vocab_size
        if max(ids) >= vocab:
            bad = self.tokenizer.convert_ids_to_tokens([i for i in ids if i >= vocab][:3])
            raise errors.BadValue(f"request {r.key}: its text holds tokens the LLM has no embedding for ({bad}); "
                                  f"remove them from the prompt file or the input")
        return ids

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t != self.ids.eos], skip_special_tokens=True).strip()

    def complete(self, requests: Sequence[Request], on_batch: Callable[[int], None] | None = None
                 ) -> list[Completion]:
        """Each request's reply, in order. `on_batch(n)` is called as each batch of n requests finishes."""
        prompts = [self.encode(r) for r in requests]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (r, p) in enumerate(zip(requests, prompts)):
            try:
                length = infer.bucket(len(p), self.length_buckets)
            except ValueError as e:
                raise errors.BadValue(f"request {r.key}: prompt of {len(p)} tokens: {e}") from None
            groups.setdefault((length, r.max_new_tokens), []).append(i)
        out: list[Completion | None] = [None] * len(requests)
        pending = None  # one batch kept in flight while the previous one is read back
        for (length, new), rows in sorted(groups.items()):
            for s in range(0, len(rows), self.batch_size):
                batch = rows[s:s + self.batch_size]
                result = self._dispatch([prompts[i] for i in batch], [requests[i].key for i in batch], length, new)
                if pending is not None:
                    self._finish(*pending, out, on_batch)
                pending = (batch, result)
        if pending is not None:
            self._finish(*pending, out, on_batch)
        return out

    def _dispatch(self, prompts, keys, length: int, max_new_tokens: int):
        pad = self.batch_size - len(prompts)
        prompts, keys = prompts + [prompts[-1]] * pad, keys + [keys[-1]] * pad
        ids, mask = infer.left_pad(prompts, length, self.ids.pad)
        seeds = np.array([seed_of(k) for k in keys], np.int32)
        sharded = [jax.device_put(x, NamedSharding(self.mesh, shd.logical_to_spec(
            ("batch",) + (None,) * (x.ndim - 1), x.shape, self.mesh))) for x in (ids, mask, seeds)]
        self.shapes.add((length, max_new_tokens))
        with jax.set_mesh(self.mesh):
            return _decode(self.graphdef, self.state, sharded[0], sharded[1], jnp.uint32(self.seed), sharded[2],
                           max_new_tokens=max_new_tokens, eos_id=self.ids.eos, pad_id=self.ids.pad,
                           temperature=self.temperature, top_p=self.top_p)

    def _finish(self, rows, result, out, on_batch):
        tokens, lengths = (np.asarray(x) for x in jax.device_get(result))
        for b, i in enumerate(rows):
            toks = [int(t) for t in tokens[b, :lengths[b]]]
            finished = bool(toks) and toks[-1] == self.ids.eos
            out[i] = Completion(self.text(toks), finished, len(toks))
        if on_batch is not None:
            on_batch(len(rows))


def _meshes(model):
    return [x.sharding.mesh for x in jax.tree.leaves(nnx.state(model))
            if isinstance(getattr(x, "sharding", None), NamedSharding)][:1]


def _batch_rows(mesh) -> int:
    """Rows a batch must be a multiple of to split evenly over the mesh axes that "batch" maps to."""
    axes = dict(shd.current_rules())["batch"]
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def _num_img_tokens(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    n = 0
    while f"[IMG{n}]" in vocab:
        n += 1
    return n


def local_mesh(spec: str = "data=-1"):
    """A mesh over this process's devices from 'data=-1' / 'data=2,fsdp=4' / ... (each process works alone)."""
    try:
        axes = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(",") if part.strip())}
    except ValueError:
        raise errors.BadValue(f"--mesh={spec!r}: expected axis=size pairs, e.g. data=-1 or data=2,fsdp=4") from None
    return shd.make_mesh(axes, jax.local_devices())


def check(path, tokenizer=None) -> str:
    """What --llm names ("workdir", "ours": a converted Mistral, "hf": a Hugging Face Mistral), from its files
    alone (no weights read): a wrong folder is a one-line error before anything is written or loaded."""
    path = Path(path)
    if (path / "checkpoints").is_dir():  # a training workdir
        if tokenizer is not None:
            raise errors.BadValue(f"--tokenizer: {path} is a training workdir; its own tokenizer is used")
        return "workdir"
    if not (path / "config.json").is_file():
        raise errors.MissingFile(f"--llm={path}: not a converted Mistral folder, a Hugging Face Mistral folder or a "
                                 f"training workdir (no config.json)")
    tok_dir = Path(tokenizer) if tokenizer else path
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise errors.MissingFile(f"--llm={path}: no tokenizer in {tok_dir} (tokenizer_config.json); pass "
                                 f"--tokenizer=the Hugging Face folder the LLM came from")
    try:
        meta = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise errors.BadValue(f"--llm={path}: config.json is not JSON ({e})") from None
    if "part" in meta:  # ours: {"part": ..., "config": ...}
        if meta["part"] != "mistral":
            raise errors.BadValue(f"--llm={path}: a converted {meta['part']!r}, not a Mistral")
        if not (path / "params").is_dir():
            raise errors.MissingFile(f"--llm={path}: a converted Mistral without its params/ folder; convert it "
                                     f"again (python -m convert mistral --from-hf HF_DIR --out {path} --overwrite)")
        return "ours"
    if meta.get("model_type") not in ("mistral", "llama"):
        raise errors.BadValue(f"--llm={path}: a Hugging Face {meta.get('model_type')!r} model; the data makers need "
                              f"a Mistral (or Llama) causal LM")
    return "hf"


def load(path, *, tokenizer=None, mesh=None, **kw) -> tuple[ChatLLM, object]:
    """(ChatLLM, the GenLLaVA model or None) from a converted Mistral folder, a Hugging Face Mistral folder (its
    tokenizer beside it unless `tokenizer` names one) or a GenLLaVA training workdir (its LLM and tokenizer; the whole
    model is returned too, e.g. to render images with it). `kw` go to ChatLLM."""
    from genllava_jax import checkpoint, converter
    from genllava_jax.data.tokenizer import load_tokenizer

    path = Path(path)
    kind = check(path, tokenizer)
    mesh = local_mesh() if mesh is None else mesh
    if kind == "workdir":
        from genllava_jax import cli

        assistant, _ = cli.load_assistant(path, mesh)
        return ChatLLM(assistant.model.llm, assistant.tokenizer, mesh=mesh, **kw), assistant
    model = checkpoint.load_module(path, mesh) if kind == "ours" else converter("mistral").from_hf(path, mesh)
    return ChatLLM(model, load_tokenizer(Path(tokenizer) if tokenizer else path, 1), mesh=mesh, **kw), None
