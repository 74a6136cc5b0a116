"""Evaluation sweeps: every cell checkpoint × benchmark × decoding setting, data-parallel and resumable.

    python -m genllava_jax.sweep --checkpoints=runs/a/train,runs/b/train \
        --benchmark=gqa:llava_gqa_testdev_balanced.jsonl:gqa/images:testdev_balanced_questions.json \
        --benchmark=pope:llava_pope_test.jsonl:coco/val2014:pope/coco \
        --settings=greedy --settings=t07:temperature=0.7,top_p=0.9,seed=1 --out=runs/sweep [--batch_size=64]

--checkpoints are training workdirs (their newest checkpoint is used); --benchmark is NAME:FILE[:FILE...] with the
files `evaluate.read_benchmark(NAME, ...)` takes; --settings is NAME[:key=val,...] over `infer.Settings` fields.

Generation benchmarks (`evaluate.generation`): --benchmark=t2i:CAPTIONS[:REFERENCE_FOLDER] (COCO captions JSON or a
JSONL of prompts) and --benchmark=edit:EDITS:IMAGE_FOLDER (MagicBrush-style). The model answers each prompt; an answer
ending in [SOI] gets its [IMG] tokens and its image (the emission rate is `soi_rate`); a setting with
force_image=true forces [SOI][IMG..] after every answer, and its metrics are named forced/... . Images go to
cells/.../<benchmark>_images/ (named in the answers' metadata) and a grid to <benchmark>_samples.png; metrics need
--clip (CLIP score, CLIP-I, CLIP-T, --clip_fid), --inception (FID against the reference folder), --dino (DINO).
The image step is jitted like the text: a full batch per (prompt bucket, steps, sampler), one compile each.

Layout under --out (a cell is checkpoint@step / setting / benchmark):
    cells/<checkpoint>@<step>/<setting>/<benchmark>.jsonl      LLaVA answer JSONL: appended batch by batch, then
                                                               rewritten in question order when the cell finishes
    cells/.../<benchmark>.spec.json   what the cell is; resuming it with other files/settings/batch size is refused
    cells/.../<benchmark>.done.json   the finished cell: its spec, item count and metrics
    results.csv, results.md           regenerated from every done.json under --out after each cell

Shapes: prompts are bucketed by length (`infer.bucket` over --length_buckets) and batches padded to the fixed global
--batch_size, so the decode function compiles once per (bucket, max_new_tokens, temperature, top_p) over the whole
sweep. Parallelism: one mesh over all devices of all hosts (data axis); batch rows are sharded over it, each host
loading only its rows' images; the outputs are gathered and only process 0 writes. Resume: a stopped sweep skips
finished cells and batches whose items are all answered; sampling is seeded per (setting seed, batch index), so a
re-run batch gives the same answers.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from genllava_jax import cli, errors, infer, sharding as shd
from genllava_jax.atomic import atomic_write, cut_torn_line
from genllava_jax.evaluate import BENCHMARKS, Item, answer_record, generation, read_answers, read_benchmark, score, \
    write_answers

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# the Markdown table's columns per benchmark (results.csv has every metric); MME's are points, the rest fractions
HEADLINE = {"vqav2": ("accuracy",), "textvqa": ("accuracy",), "gqa": ("accuracy",),
            "pope": ("f1", "accuracy", "yes_ratio"), "mme": ("perception", "cognition"),
            "scienceqa": ("img_accuracy", "accuracy"), "mmbench": ("circular_accuracy", "accuracy"),
            "seed": ("accuracy",)}
POINTS = ("mme",)
HEADLINE.update({"t2i": ("soi_rate", "clip_score", "fid", "clip_fid"),
                 "edit": ("soi_rate", "l1", "l2", "clip_i", "dino", "clip_t")})
RAW = ("images", "clip_score", "fid", "clip_fid", "l1", "l2", "clip_i", "dino", "clip_t")  # not shown as percent
ALL_BENCHMARKS = (*BENCHMARKS, *generation.IMAGE_BENCHMARKS)


# --- the sweep's axes --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    files: tuple[str, ...]


def parse_benchmark(spec: str) -> Benchmark:
    """NAME:FILE[:FILE...] -> Benchmark."""
    name, *files = spec.split(":")
    if name not in ALL_BENCHMARKS:
        raise errors.BadValue(f"--benchmark={spec!r}: unknown benchmark {name!r}; known: {sorted(ALL_BENCHMARKS)}")
    if not files or not all(files):
        raise errors.BadValue(f"--benchmark={spec!r}: expected NAME:FILE[:FILE...] (the files read_benchmark takes)")
    return Benchmark(name, tuple(files))


def parse_settings(spec: str) -> tuple[str, infer.Settings]:
    """NAME[:key=val,...] -> (NAME, infer.Settings); values take the type of the field's default."""
    name, _, body = spec.partition(":")
    if not _NAME.match(name):
        raise errors.BadValue(f"--settings={spec!r}: the name {name!r} must be letters, digits, '_', '.', '-'")
    defaults = infer.Settings()
    kw = {}
    for part in filter(None, body.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise errors.BadValue(f"--settings={spec!r}: {part!r} is not key=value")
        if not hasattr(defaults, key):
            fields = [f.name for f in dataclasses.fields(infer.Settings)]
            raise errors.BadValue(f"--settings={spec!r}: unknown key {key!r}; infer.Settings has {fields}")
        try:
            if isinstance(getattr(defaults, key), bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                kw[key] = value.lower() in ("true", "1")
            else:
                kw[key] = type(getattr(defaults, key))(value)
        except ValueError:
            raise errors.BadValue(f"--settings={spec!r}: {key}={value!r} is not a "
                                  f"{type(getattr(defaults, key)).__name__}")
    return name, infer.Settings(**kw)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: str  # the training workdir as given
    step: int

    @property
    def label(self) -> str:
        return f"{self.path}@{self.step}"

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.path).strip("_.") + f"@{self.step}"


def latest_step(workdir) -> int:
    from genllava_jax import checkpoint

    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        raise errors.MissingFile(f"{workdir}: no checkpoints/ directory; pass the --workdir of a training run")
    mngr = checkpoint.ocp.CheckpointManager(root.absolute())
    step = mngr.latest_step()
    mngr.close()
    if step is None:
        raise errors.MissingFile(f"{root}: no checkpoint")
    return int(step)


# --- one cell ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    index: int  # position in the cell's schedule: seeds its sampling
    length: int  # prompt bucket
    rows: tuple[int, ...]  # item indices (a bucket's last batch may have fewer than batch_size)


def prompts_of(assistant: infer.Assistant, items: Sequence[Item]) -> list[list[int]]:
    """Each item's question as a first user turn of the assistant's template: i2t with its image, text, or the
    generation benchmarks' t2i (the prompt) and edit (the source image and the instruction)."""
    def task(it):
        return it.meta.get("task") or ("i2t" if it.image is not None else "text")

    return [assistant.prompt([], it.prompt, task=task(it), has_image=it.image is not None) for it in items]


def plan(prompts: Sequence[Sequence[int]], items: Sequence[Item], batch_size: int,
         buckets: Sequence[int]) -> list[Batch]:
    """Items grouped by prompt bucket (in file order within one), cut into batches: the same for every host."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        try:
            groups.setdefault(infer.bucket(len(p), tuple(buckets)), []).append(i)
        except ValueError as e:
            raise errors.BadValue(f"{items[i].source}: prompt of {len(p)} tokens: {e}") from None
    out: list[Batch] = []
    for length in sorted(groups):
        rows = groups[length]
        for s in range(0, len(rows), batch_size):
            out.append(Batch(len(out), length, tuple(rows[s:s + batch_size])))
    return out


def read_answered(path: Path) -> dict[str, str]:
    """key -> text of a cell's answer file; a torn last line (a kill mid-write) is cut off first."""
    return {k: r["text"] for k, r in read_answer_records(path).items()}


def read_answer_records(path: Path) -> dict[str, dict]:
    """key -> answer record of a cell's answer file; a torn last line (a kill mid-write) is cut off first."""
    if not path.exists():
        return {}
    cut_torn_line(path)
    out = {}
    for r in read_answers(path):
        key = (r.get("metadata") or {}).get("key")
        if key is None:
            raise errors.BadValue(f"{path}: answer for question_id {r['question_id']!r} has no metadata.key; the "
                                  f"file was not written by a sweep")
        out.setdefault(key, r)
    return out


def _from_main(x):
    """Process 0's value on every process (one process: x itself)."""
    return x if jax.process_count() == 1 else multihost_utils.broadcast_one_to_all(x)


def local_rows(sharding: NamedSharding, batch_size: int) -> list[int]:
    """The global batch rows this process's devices hold, in order."""
    idx = sharding.addressable_devices_indices_map((batch_size,))
    return sorted({r for sl in idx.values() for r in range(*sl[0].indices(batch_size))})


class CellRunner:
    """Decodes one cell's batches on the mesh, appending answers (process 0) as they finish."""

    def __init__(self, assistant: infer.Assistant, mesh, batch_size: int):
        self.assistant, self.mesh, self.batch_size = assistant, mesh, batch_size
        self.sharding = NamedSharding(mesh, P(shd.logical_to_spec(("batch",), (batch_size,), mesh)[0]))
        self.local = local_rows(self.sharding, batch_size)
        self.graphdef, self.state = nnx.split(assistant.model)
        self.answered = 0  # answers written (process 0)
        self.image_shapes: set = set()  # (prompt bucket, steps, sampler) of the image batches run

    def _global(self, local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.sharding, local, (self.batch_size, *local.shape[1:]))

    def _dispatch(self, batch: Batch, items, prompts, settings: infer.Settings):
        a, ids = self.assistant, self.assistant.ids
        rows = list(batch.rows) + [batch.rows[-1]] * (self.batch_size - len(batch.rows))  # padding repeats a row
        mine = [rows[r] for r in self.local]
        x, mask = infer.left_pad([prompts[i] for i in mine], batch.length, ids.pad)
        pixels, has_image, _ = a.pixels([items[i].load_image() for i in mine])
        rng = jax.random.fold_in(jax.random.key(settings.seed), batch.index)
        # decode_arrays, not decode (which fetches to one host): outputs stay global for the gather
        args = map(self._global, (x, mask, pixels, has_image))
        return infer.decode_arrays(self.graphdef, self.state, *args, rng, max_new_tokens=settings.max_new_tokens,
                                   eos_id=ids.eos, stop_ids=(ids.soi,), pad_id=ids.pad,
                                   temperature=float(settings.temperature), top_p=float(settings.top_p),
                                   on_token=None)

    def _images(self, batch: Batch, items, prompts, settings: infer.Settings, tokens, lengths):
        """(rows, uint8 images) for the batch's answers that end in [SOI] (all, with force_image): their prompt,
        answer and [IMG0..N-1] through the jitted generation, on a full batch (rows repeated) so that each prompt
        bucket compiles once."""
        a, ids = self.assistant, self.assistant.ids
        gen = []
        for r in range(len(batch.rows)):
            toks = [int(t) for t in tokens[r][:lengths[r]]]
            if (toks and toks[-1] == ids.soi) or settings.force_image:
                body = toks[:-1] if toks and toks[-1] == ids.soi else [t for t in toks if t != ids.eos]
                gen.append((r, prompts[batch.rows[r]] + body + list(ids.generation)))
        if not gen:
            return [], None
        length = infer.bucket(max(len(g) for _, g in gen), a.length_buckets)
        mine = [gen[j % len(gen)] for j in self.local]
        x, mask = infer.left_pad([g for _, g in mine], length, ids.pad)
        pixels, has_image, vae = a.pixels([items[batch.rows[r]].load_image() for r, _ in mine])
        sampler = infer.SAMPLERS[settings.sampler](a.model.cfg.schedule)
        arrays = dict(zip(("input_ids", "attention_mask", "image", "has_image", "source_image"),
                          map(self._global, (x, mask, pixels, has_image, vae))))
        rng = jax.random.fold_in(jax.random.key(settings.seed), 1 << 20 | batch.index)
        out = infer._images(self.graphdef, self.state, arrays, rng, jnp.float32(settings.guidance_scale),
                            jnp.float32(settings.image_guidance_scale), sampler=sampler, num_steps=settings.num_steps)
        self.image_shapes.add((length, settings.num_steps, settings.sampler))
        pix = multihost_utils.process_allgather(out, tiled=True)[:len(gen)]
        return [r for r, _ in gen], np.asarray((pix + 1) * 127.5).round().clip(0, 255).astype(np.uint8)

    def run(self, items: Sequence[Item], prompts, settings: infer.Settings, answers: Path, model_id: str,
            desc: str = "", images_dir: Path | None = None) -> dict[str, str]:
        """Every item's answer (by key) on process 0; batches whose items are all in `answers` are skipped. With
        `images_dir` (generation benchmarks) each answer ending in [SOI] also gets its image there, named in the
        answer's metadata (soi: whether the model emitted [SOI] itself)."""
        main = jax.process_index() == 0
        answered = read_answered(answers) if main else {}
        batches = plan(prompts, items, self.batch_size, self.assistant.length_buckets)
        todo = _from_main(np.array([not all(items[i].key in answered for i in b.rows) for b in batches]))
        todo = [b for b, t in zip(batches, todo) if t]
        bar = tqdm(total=len(items), initial=len(items) - sum(len(b.rows) for b in todo), desc=desc, unit="q",
                   disable=not main, file=sys.stderr, leave=False)

        def finish(batch, out):
            tokens, lengths = multihost_utils.process_allgather(tuple(out), tiled=True)
            made = {}
            if images_dir is not None:  # every process joins the generation; process 0 writes the files
                rows, pix = self._images(batch, items, prompts, settings, tokens, lengths)
                if main:
                    images_dir.mkdir(parents=True, exist_ok=True)
                    for r, im in zip(rows, pix if pix is not None else []):
                        made[r] = image_name(items[batch.rows[r]].key)
                        _write_png(images_dir / made[r], im)
            if main:
                new = []
                for r, i in enumerate(batch.rows):
                    if items[i].key not in answered:
                        answered[items[i].key] = self.assistant.text(tokens[r][:lengths[r]])
                        rec = answer_record(items[i], answered[items[i].key], model_id)
                        rec["metadata"]["key"] = items[i].key
                        if images_dir is not None:
                            n = int(lengths[r])
                            rec["metadata"].update(soi=bool(n and tokens[r][n - 1] == self.assistant.ids.soi),
                                                   image=made.get(r))
                        new.append(rec)
                write_answers(answers, new, append=True)
                self.answered += len(new)
            bar.update(len(batch.rows))

        pending = None
        with jax.set_mesh(self.mesh):
            for batch in todo:  # dispatch is asynchronous: batch k+1's host work overlaps batch k on the devices
                out = self._dispatch(batch, items, prompts, settings)
                if pending is not None:
                    finish(*pending)
                pending = batch, out
            if pending is not None:
                finish(*pending)
        bar.close()
        return answered


# --- files -------------------------------------------------------------------------------------------------------


def image_name(key: str) -> str:
    """A file name for an item's image: its key made safe, with a hash of the key (keys that differ only in
    characters replaced here stay apart)."""
    safe = re.sub(r"[^A-Za-z0-9_.@#-]+", "_", key)[:80]
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.png"


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _write_json(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


@dataclasses.dataclass(frozen=True)
class Cell:
    checkpoint: Checkpoint
    setting: str
    settings: infer.Settings
    benchmark: Benchmark

    def path(self, out: Path, suffix: str) -> Path:
        return out / "cells" / self.checkpoint.dirname / self.setting / f"{self.benchmark.name}{suffix}"

    def spec(self, batch_size: int, buckets: Sequence[int], lenient: bool = False) -> dict:
        spec = {"checkpoint": self.checkpoint.path, "step": self.checkpoint.step, "setting": self.setting,
                "settings": dataclasses.asdict(self.settings), "benchmark": self.benchmark.name,
                "files": list(self.benchmark.files), "batch_size": batch_size, "length_buckets": list(buckets)}
        if lenient:  # only when asked, so that cells made before the option existed still match
            spec["lenient"] = True
        return spec


def _diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """'key: old -> new' for every field of `new` that differs (nested dicts by their sub-keys)."""
    out = []
    for k in new:
        a, b = old.get(k), new[k]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def cell_status(cell: Cell, out: Path, spec: dict) -> str:
    """'done', 'todo', or why the cell's files on disk belong to another spec."""
    for suffix in (".done.json", ".spec.json"):
        path = cell.path(out, suffix)
        if path.exists():
            old = json.loads(path.read_text())
            diff = _diff(old, spec)
            if diff:
                return f"{path} was made with other {', '.join(diff)}; use another --out or delete the cell's files"
    return "done" if cell.path(out, ".done.json").exists() else "todo"


def finish_cell(cell: Cell, out: Path, spec: dict, items: Sequence[Item], answered: Mapping[str, str],
                model_id: str, encoders: generation.Encoders | None = None) -> dict:
    """Rewrites the answers in question order (a LLaVA answer file), scores them, records the cell as done.
    Generation cells are scored on their images with `encoders` (see evaluate.generation), their metrics named
    `forced/...` when [SOI] was forced, and a grid of their first 32 images saved beside the answers."""
    texts = [answered[it.key] for it in items]
    path = cell.path(out, ".jsonl")
    image_cell = cell.benchmark.name in generation.IMAGE_BENCHMARKS
    kept = read_answer_records(path) if image_cell else {}
    recs = []
    for it, t in zip(items, texts):
        recs.append(answer_record(it, t, model_id))
        recs[-1]["metadata"]["key"] = it.key
        recs[-1]["metadata"].update({k: v for k, v in kept.get(it.key, {}).get("metadata", {}).items()
                                     if k in ("soi", "image")})
    with atomic_write(path) as tmp:
        write_answers(tmp, recs)
    done = {**spec, "n": len(items), "metrics": {}}
    if image_cell:
        done["metrics"] = _image_metrics(cell, out, items, recs, encoders or generation.Encoders(),
                                         spec.get("encoders", {}).get("clip_fid", False))
    elif all(it.answers for it in items):
        try:
            done["metrics"] = score(cell.benchmark.name, texts, items, lenient=spec.get("lenient", False))
        except ValueError as e:  # answers the official scorer cannot read: keep them, say why there is no number
            done["score_error"] = str(e)
    _write_json(cell.path(out, ".done.json"), done)
    return done


def _image_metrics(cell: Cell, out: Path, items, recs, encoders, clip_fid: bool) -> dict:
    from PIL import Image

    folder = cell.path(out, "_images")
    names = {r["metadata"]["key"]: r["metadata"].get("image") for r in recs}
    images = {k: np.asarray(Image.open(folder / n).convert("RGB")) for k, n in names.items() if n}
    emitted = {r["metadata"]["key"]: r["metadata"].get("soi", False) for r in recs}
    if cell.benchmark.name == "t2i":
        metrics = generation.t2i_metrics(items, images, emitted, encoders, clip_fid=clip_fid, cache_dir=out / "cache")
    else:
        metrics = generation.edit_metrics(items, images, emitted, encoders)
    shown = [images[it.key] for it in items if it.key in images][:32]
    if shown:
        Image.fromarray(infer.image_grid(np.stack(shown))).save(cell.path(out, "_samples.png"))
    if cell.settings.force_image:  # labelled: these images did not need the model to ask for them
        metrics = {(k if k == "soi_rate" else f"forced/{k}"): v for k, v in metrics.items()}
    return metrics


def _fmt(bench: str, value, metric: str = "") -> str:
    if value is None:
        return ""
    if metric.split("/")[-1] in RAW:
        return f"{value:.4g}"
    return f"{value:.1f}" if bench in POINTS else f"{100 * value:.1f}"


def write_results(out) -> list[dict]:
    """results.csv (every metric) and results.md (headline metrics, % except MME points) from all finished cells:
    one row per checkpoint × setting, sorted, so the files depend only on which cells are done."""
    out = Path(out)
    rows: dict[tuple, dict[str, dict]] = {}
    for path in sorted((out / "cells").glob("*/*/*.done.json")):
        d = json.loads(path.read_text())
        rows.setdefault((d["checkpoint"], d["step"], d["setting"]), {})[d["benchmark"]] = d
    benches = sorted({b for r in rows.values() for b in r})
    metrics = {b: sorted({m for r in rows.values() if b in r for m in r[b]["metrics"]}) for b in benches}
    head = ["checkpoint", "step", "setting"] + [f"{b}/{m}" for b in benches for m in ["n", *metrics[b]]]
    table = []
    for key in sorted(rows):
        line = list(key)
        for b in benches:
            d = rows[key].get(b)
            line += [d["n"], *(d["metrics"].get(m, "") for m in metrics[b])] if d else [""] * (1 + len(metrics[b]))
        table.append(line)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([head, *table])
    (out / "results.csv").write_text(buf.getvalue())

    cols = [(b, m) for b in benches for h in HEADLINE[b] for m in (h, f"forced/{h}") if m in metrics[b]]
    md = ["| checkpoint | setting | " + " | ".join(f"{b} {m}" for b, m in cols) + " |",
          "|---|---|" + "---:|" * len(cols)]
    for (ckpt, step, setting), r in sorted(rows.items()):
        vals = [_fmt(b, r[b]["metrics"].get(m), m) if b in r else "" for b, m in cols]
        md.append(f"| {ckpt}@{step} | {setting} | " + " | ".join(vals) + " |")
    note = ("Percent, except MME (points) and the image metrics (CLIP score x100, FID, L1, L2, cosines as they "
            "are); forced/: images from [SOI][IMG..] forced after the answer. Every metric: results.csv.")
    (out / "results.md").write_text("\n".join(md) + f"\n\n{note}\n")
    return [dict(zip(head, t)) for t in table]


# --- the sweep ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    cells_run: int = 0
    cells_skipped: int = 0
    answered: int = 0  # new answers written by this run
    shapes: set = dataclasses.field(default_factory=set)  # (checkpoint, bucket, max_new_tokens, temperature, top_p)
    image_shapes: set = dataclasses.field(default_factory=set)  # (checkpoint, prompt bucket, steps, sampler)


def run(checkpoints: Sequence[str], benchmarks: Sequence[Benchmark], settings: Mapping[str, infer.Settings], out,
        *, batch_size: int = 0, length_buckets: Sequence[int] = DEFAULT_BUCKETS, mesh=None,
        lenient: bool = False, encoders: Mapping[str, str | bool] | None = None) -> Summary:
    """Evaluates every (checkpoint, setting, benchmark) cell not yet finished under `out`; see the module doc.
    batch_size 0: 8 rows per device. `lenient`: also the multiple-choice metrics under a rule that is not official
    (`lenient/...` in results.csv). `encoders`: the generation metrics' {clip, inception, dino: path, clip_fid}."""
    out = Path(out)
    mesh = shd.make_mesh({"data": -1}) if mesh is None else mesh
    batch_size = batch_size or 8 * mesh.size
    data_size = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % data_size:
        raise errors.BadValue(f"--batch_size={batch_size} must be a multiple of the {data_size} data-parallel devices")
    if len({b.name for b in benchmarks}) != len(benchmarks):
        raise errors.BadValue(f"a benchmark is given twice: {[b.name for b in benchmarks]}")
    if not benchmarks or not settings or not checkpoints:
        raise errors.BadValue("need at least one checkpoint, benchmark and setting")
    main = jax.process_index() == 0
    buckets = tuple(sorted(length_buckets))
    items = {b.name: generation.READERS[b.name](*b.files) if b.name in generation.IMAGE_BENCHMARKS
             else read_benchmark(b.name, *b.files) for b in benchmarks}
    encoders = {k: v for k, v in (encoders or {}).items() if v}
    enc = None
    if main and any(b.name in generation.IMAGE_BENCHMARKS for b in benchmarks):
        enc = generation.Encoders.load(**{k: v for k, v in encoders.items() if k != "clip_fid"})
    summary = Summary()
    for path in checkpoints:
        ckpt = Checkpoint(os.path.normpath(path), latest_step(path))
        cells = [Cell(ckpt, name, s, b) for name, s in settings.items() for b in benchmarks]
        specs = [c.spec(batch_size, buckets, lenient) for c in cells]
        for c, sp in zip(cells, specs):
            if c.benchmark.name in generation.IMAGE_BENCHMARKS:
                sp["encoders"] = encoders
        status = [cell_status(c, out, s) for c, s in zip(cells, specs)] if main else ["todo"] * len(cells)
        bad = [s for s in status if s not in ("done", "todo")]
        if _from_main(np.array(len(bad))):
            raise ValueError("\n".join(bad) or "process 0 refused a cell (see its log)")
        todo = [i for i, t in enumerate(_from_main(np.array([s == "todo" for s in status]))) if t]
        summary.cells_skipped += len(cells) - len(todo)
        if not todo:
            continue
        assistant = cli.load_assistant(path, mesh, buckets)[0]
        runner = CellRunner(assistant, mesh, batch_size)
        prompts = {}
        for i in todo:
            cell, spec = cells[i], specs[i]
            name = cell.benchmark.name
            if name not in prompts:
                prompts[name] = prompts_of(assistant, items[name])
            if main:
                cell.path(out, "").parent.mkdir(parents=True, exist_ok=True)
                _write_json(cell.path(out, ".spec.json"), spec)
            model_id = f"{ckpt.label}:{cell.setting}"
            image_cell = name in generation.IMAGE_BENCHMARKS
            answered = runner.run(items[name], prompts[name], cell.settings, cell.path(out, ".jsonl"), model_id,
                                  desc=f"{ckpt.label} {cell.setting} {name}",
                                  images_dir=cell.path(out, "_images") if image_cell else None)
            s = cell.settings
            summary.shapes |= {(ckpt.label, b.length, s.max_new_tokens, s.temperature, s.top_p)
                               for b in plan(prompts[name], items[name], batch_size, buckets)}
            if main:
                done = finish_cell(cell, out, spec, items[name], answered, model_id, enc)
                write_results(out)
                shown = {m: round(v, 4) for m, v in done["metrics"].items()
                         if m.removeprefix("forced/") in HEADLINE[name]}
                tqdm.write(f"{ckpt.label} {cell.setting} {name}: {done.get('score_error', shown)}", file=sys.stderr)
            summary.cells_run += 1
        summary.answered += runner.answered
        summary.image_shapes |= {(ckpt.label, *sh) for sh in runner.image_shapes}
    if main:
        write_results(out)
    return summary


def define_flags():
    from absl import flags

    flags.DEFINE_list("checkpoints", None, "training workdirs, comma-separated (each one's newest checkpoint)")
    flags.DEFINE_multi_string("benchmark", [], "NAME:FILE[:FILE...], repeatable; NAME in " + ", ".join(ALL_BENCHMARKS))
    flags.DEFINE_multi_string("settings", ["greedy"], "NAME[:key=val,...] over infer.Settings fields, repeatable")
    flags.DEFINE_string("out", None, "output directory (answers, results.csv, results.md); resumable")
    flags.DEFINE_integer("batch_size", 0, "global batch size (a multiple of the devices); 0: 8 per device")
    flags.DEFINE_list("length_buckets", [str(b) for b in DEFAULT_BUCKETS], "prompt length buckets")
    flags.DEFINE_bool("lenient", False, "also score multiple choice with a lenient, NOT official rule "
                      "(lenient/... columns in results.csv)")
    flags.DEFINE_string("clip", None, "t2i/edit: a transformers CLIP folder (CLIP score, CLIP-I, CLIP-T, CLIP-FID)")
    flags.DEFINE_string("inception", None, "t2i: pytorch-fid's FID Inception weights (.pth) or ours (FID)")
    flags.DEFINE_string("dino", None, "edit: a DINO ViT-S/16 ViTModel folder or ours (DINO)")
    flags.DEFINE_bool("clip_fid", False, "t2i: also FID on CLIP image features")


def _main(argv):
    from absl import app, flags

    from genllava_jax import distributed

    del argv
    distributed.initialize()  # multi-host: before anything touches a device
    F = flags.FLAGS
    if not F.checkpoints or not F.benchmark or not F.out:
        raise app.UsageError("--checkpoints, --benchmark and --out are required")
    settings = dict(parse_settings(s) for s in F.settings)
    if len(settings) != len(F.settings):
        raise app.UsageError(f"a --settings name is given twice: {F.settings}")
    benchmarks = [parse_benchmark(b) for b in F.benchmark]
    for spec, b in zip(F.benchmark, benchmarks):
        missing = [f for f in b.files if not Path(f).exists()]
        if missing:
            raise errors.MissingFile(f"--benchmark={spec}: {', '.join(missing)} does not exist")
    s = run(F.checkpoints, benchmarks, settings, F.out, batch_size=F.batch_size,
            length_buckets=[int(b) for b in F.length_buckets], lenient=F.lenient,
            encoders=dict(clip=F.clip, inception=F.inception, dino=F.dino, clip_fid=F.clip_fid))
    if jax.process_index() == 0:
        print(f"{s.cells_run} cells run, {s.cells_skipped} already done, {s.answered} new answers")
        print((Path(F.out) / "results.md").read_text())


def main():
    define_flags()
    errors.run(_main)


if __name__ == "__main__":
    main()
