"""The grain input pipeline: GVIT records -> fixed-shape numpy batches, so the train step compiles once.

    iterator, info = make_dataset(cfg.data, load_tokenizer(cfg.data.tokenizer), global_batch=128, seed=0)
    batch = next(iterator)  # state: iterator.get_state() / set_state(), or grain.checkpoint.CheckpointSave in orbax

A batch (B = this process's rows, T = max_len, H = image_size, Ht = target_image_size):
    input_ids, labels (IGNORE = -100 off the answers; aligned with input_ids, the loss shifts), attention_mask:
    int32 (B, T); image: float32 (B, H, H, 3) SigLIP-preprocessed; target_image, source_image (the edit's input):
    float32 (B, Ht, Ht, 3) in [-1, 1]; has_image, has_target: bool (B,); task: int32 (B,) index into TASKS
    (0 text, 1 i2t, 2 t2i, 3 edit). Absent images are zeros. With data.caption_tokenizer (a CLIP tokenizer, for
    model.lambda_align) also caption_ids: int32 (B, caption_max_len), the record's `caption` (a t2i record's prompt
    when it has none) as SD's pipelines tokenize a prompt, and has_caption: bool (B,).

Per source: this process's shard (`[process_index::process_count]`), a seeded shuffle, repeated with a new order
each epoch; sources are mixed by weight (grain.MapDataset.mix). Records the step cannot use are skipped, never
fatal, and counted by reason (records.REASONS) in `info.counts`, with the records read and those fixed (cut to
max_len); the reasons travel with the batches, so worker processes report too, and the counts are part of the
iterator's state, so they survive a checkpoint restore. With train=False: one pass in file order, the last batch
padded with empty rows (attention_mask all 0).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from genllava_jax import errors
from genllava_jax.constants import IGNORE
from genllava_jax.data import arrayrecord
from genllava_jax.data.image import ImageConfig, preprocess, to_rgb
from genllava_jax.data.records import (REASONS, TASKS, BadRecord, Record, load_image, log_skip, parse, read_records,
                                       where)
from genllava_jax.data.template import GENERATES, TASK_TOKEN, encode_conversation
from genllava_jax.data.tokenizer import SpecialIds, clip_tokens, load_clip_tokenizer

MAX_SKIPS_IN_A_ROW = 1000  # more means the data is unusable (wrong folder, ...): fail instead of spinning forever
FIXES = ("truncated",)  # what is done to records that are kept but changed, counted like the skips


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section's defaults (the one schema: genllava_jax.config)."""
    from genllava_jax.config import data_config

    return data_config()


def sources(path) -> list[tuple[str, float]]:
    """[(path, weight)] from data_cfg.path."""
    if not isinstance(path, str):
        return [(p["path"], float(p.get("weight", 1.0))) for p in path]
    out = []
    for part in path.split(","):
        head, _, tail = part.strip().rpartition(":")
        try:
            out.append((head, float(tail)))
        except ValueError:  # no weight (a colon may still be part of the path, as in gs://)
            out.append((part.strip(), 1.0))
    return out


def vae_pixels(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [-1, 1], the VAE's input range."""
    image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32) / 127.5 - 1


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Raw record -> one example of fixed shapes, or {"skip": reason}. Picklable, for grain's worker processes."""
    tokenizer: Any
    ids: SpecialIds
    base_dir: Path
    max_len: int
    image_size: int
    num_patches: int
    target_size: int
    on_too_long: str
    root: Path | None = None  # image paths must resolve inside it (default: base_dir)
    max_pixels: int | None = None
    caption_tokenizer: Any = None  # a CLIP tokenizer: rows get caption_ids / has_caption
    caption_len: int = 77
    source: str = ""  # the data file, named in the log of skips
    packed: bool = False  # raw bytes are msgpack (ArrayRecord entries), else a JSON line

    def __call__(self, item) -> dict:
        """item: (position, raw record) as the pipeline's sources give them, or a raw record."""
        position, raw = item if isinstance(item, tuple) else (None, item)
        try:
            ex, fixes = self.encode(raw)
            return {**ex, "_fixed": fixes}
        except Exception as e:  # anything a record raises is a skip counted by reason, never the end of the run
            bad = isinstance(e, BadRecord)
            reason = e.reason if bad else "encode_error"
            log_skip(where(self.source, position) if position is not None else f"a record of {self.source}", reason,
                     e.detail if bad else f"{type(e).__name__}: {e}")
            return {"skip": reason}

    def encode(self, raw) -> tuple[dict, list[str]]:
        """(example, what was fixed in it); BadRecord if it must be skipped."""
        if isinstance(raw, bytes) and self.packed:
            raw = arrayrecord.unpack(raw)
        return self.example(parse(raw, self.base_dir, self.root))

    def check_reserved(self, input_ids: list[int], record: Record) -> None:
        """Reserved ids come from the template only: text that tokenises to <image>, [SOI], </s>, ... is refused."""
        want = collections.Counter({self.ids.bos: 1})
        want[self.ids.eos] += len(record.turns)
        want[self.ids.image] += self.num_patches if record.image is not None else 0
        if record.task in TASK_TOKEN:
            want[getattr(self.ids, TASK_TOKEN[record.task])] += 1
        for i in self.ids.generation:
            want[i] += record.task in GENERATES
        got = collections.Counter(input_ids)
        reserved = {self.ids.bos, self.ids.eos, self.ids.image, self.ids.i2t, self.ids.t2i, *self.ids.generation}
        bad = sorted(i for i in reserved if got[i] != want[i])
        if bad:
            raise BadRecord("special_token_in_text", f"reserved tokens {self.tokenizer.convert_ids_to_tokens(bad)} "
                                                     "appear in the text")

    def fit(self, input_ids: list[int], labels: list[int], task: str) -> tuple[list[int], list[int]]:
        if len(input_ids) <= self.max_len:
            return input_ids, labels
        if self.on_too_long == "drop":
            raise BadRecord("too_long")
        ids_cut, labels_cut = input_ids[:self.max_len], labels[:self.max_len]
        if (ids_cut.count(self.ids.image) != input_ids.count(self.ids.image)
                or (task in GENERATES and self.ids.eoi not in ids_cut) or all(x == IGNORE for x in labels_cut)):
            raise BadRecord("too_long", "a cut would split the image or the generation tokens, or leave no label")
        return ids_cut, labels_cut

    def example(self, record: Record) -> tuple[dict, list[str]]:
        input_ids, labels = encode_conversation(self.tokenizer, self.ids, list(record.turns), task=record.task,
                                                num_patches=self.num_patches)
        self.check_reserved(input_ids, record)
        fixes = ["truncated"] if len(input_ids) > self.max_len else []
        input_ids, labels = self.fit(input_ids, labels, record.task)
        ex = self.blank()
        n = len(input_ids)
        ex["input_ids"][:n], ex["labels"][:n], ex["attention_mask"][:n] = input_ids, labels, 1
        ex["task"] = np.int32(TASKS.index(record.task))
        if record.image is not None:
            image = load_image(record.image, self.max_pixels)
            ex["image"] = preprocess(image, ImageConfig(size=(self.image_size,) * 2))
            ex["has_image"] = np.bool_(True)
            if record.task == "edit":
                ex["source_image"] = vae_pixels(image, self.target_size)
        if record.target_image is not None:
            ex["target_image"] = vae_pixels(load_image(record.target_image, self.max_pixels), self.target_size)
            ex["has_target"] = np.bool_(True)
        caption = record.caption or (record.turns[0][0] if record.task == "t2i" else None)
        if self.caption_tokenizer is not None and caption:
            ex["caption_ids"] = clip_tokens(self.caption_tokenizer, [caption], self.caption_len)[0][0]
            ex["has_caption"] = np.bool_(True)
        return ex, fixes

    def blank(self) -> dict:
        """An empty row: what the padding rows of the last eval batch are."""
        t, s, h = self.max_len, self.image_size, self.target_size
        row = dict(input_ids=np.full(t, self.ids.pad, np.int32), labels=np.full(t, IGNORE, np.int32),
                   attention_mask=np.zeros(t, np.int32), image=np.zeros((s, s, 3), np.float32),
                   has_image=np.bool_(False), target_image=np.zeros((h, h, 3), np.float32),
                   has_target=np.bool_(False), source_image=np.zeros((h, h, 3), np.float32), task=np.int32(0))
        if self.caption_tokenizer is not None:
            row |= dict(caption_ids=np.zeros(self.caption_len, np.int32), has_caption=np.bool_(False))
        return row


class _SkipCounting(grain.IterDataset):
    """Drops {"skip": reason} elements; their reasons ride on the next kept example (worker -> main process)."""

    def __iter__(self):
        return _SkipCountingIterator(self._parent.__iter__())


class _SkipCountingIterator(grain.DatasetIterator):

    def __next__(self) -> dict:
        reasons = []
        while True:
            try:
                ex = next(self._parent)
            except StopIteration:
                if reasons:  # the end of a finite pass: a row-less element that still reports them
                    return {"_skipped": reasons}
                raise
            if "skip" not in ex:
                return {**ex, "_skipped": reasons}
            reasons.append(ex["skip"])
            if len(reasons) >= MAX_SKIPS_IN_A_ROW:
                raise errors.Stopped(f"{len(reasons)} records in a row were unusable: "
                                     f"{dict(collections.Counter(reasons))}; check data.path and its images")

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _collate(examples: list[dict], *, batch_size: int, blank: dict) -> dict:
    rows = [ex for ex in examples if "input_ids" in ex]
    rows += [blank] * (batch_size - len(rows))
    batch = {k: np.stack([row[k] for row in rows]) for k in blank}
    batch["_skipped"] = [r for ex in examples for r in ex["_skipped"]]
    batch["_fixed"] = [r for ex in examples for r in ex.get("_fixed", ())]
    return batch


@dataclasses.dataclass
class DataCounts:
    """What this process has read so far: records (kept or not), skips by reason, fixes by kind."""
    read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fixed: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def state(self) -> dict:
        return {"read": self.read, "skipped": dict(self.skipped), "fixed": dict(self.fixed)}

    def load(self, state: dict) -> None:
        self.read = state["read"]
        self.skipped.clear(), self.skipped.update(state["skipped"])
        self.fixed.clear(), self.fixed.update(state["fixed"])

    def vector(self) -> np.ndarray:
        """[read, skips in REASONS order, fixes in FIXES order]: a fixed layout that hosts can sum."""
        return np.array([self.read, *(self.skipped[r] for r in REASONS), *(self.fixed[f] for f in FIXES)], np.int64)

    @classmethod
    def from_vector(cls, v) -> "DataCounts":
        v = [int(x) for x in v]
        skipped = collections.Counter({r: n for r, n in zip(REASONS, v[1:]) if n})
        return cls(v[0], skipped, collections.Counter({f: n for f, n in zip(FIXES, v[1 + len(REASONS):]) if n}))


class _Count(grain.IterDataset):
    """The last stage: takes the reasons off each batch and counts them; its state carries the counts."""

    def __init__(self, parent, counts: DataCounts):
        super().__init__(parent)
        self.counts = counts

    def __iter__(self):
        return _CountIterator(self._parent.__iter__(), self.counts)


class _CountIterator(grain.DatasetIterator):

    def __init__(self, parent, counts: DataCounts):
        super().__init__(parent)
        self.counts = counts

    def __next__(self) -> dict:
        batch = next(self._parent)
        skipped = batch.pop("_skipped")
        self.counts.skipped.update(skipped)
        self.counts.fixed.update(batch.pop("_fixed"))
        self.counts.read += len(skipped) + int(batch["attention_mask"].any(axis=1).sum())
        return batch

    def get_state(self):
        return {"pipeline": self._parent.get_state(), "counts": self.counts.state()}

    def set_state(self, state):
        if "counts" not in state:  # a checkpoint written before the counts were saved
            return self._parent.set_state(state)
        self._parent.set_state(state["pipeline"])
        self.counts.load(state["counts"])


def global_counts(counts: DataCounts) -> DataCounts:
    """The counts summed over all processes (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return DataCounts.from_vector(counts.vector())
    from jax.experimental import multihost_utils

    return DataCounts.from_vector(multihost_utils.process_allgather(counts.vector()).sum(0))


@dataclasses.dataclass(frozen=True)
class DataInfo:
    max_len: int
    global_batch: int
    batch_size: int  # this process's rows
    vocab_size: int  # len(tokenizer), added tokens included
    special_ids: SpecialIds
    num_records: dict[str, int]  # per source path, before sharding
    counts: DataCounts  # read / skipped / fixed so far by this process (updated as batches are taken)

    @property
    def skipped(self) -> collections.Counter:
        return self.counts.skipped


def make_dataset(data_cfg: ml_collections.ConfigDict, tokenizer, *, global_batch: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 train: bool = True) -> tuple[grain.DatasetIterator, DataInfo]:
    """(iterator of fixed-shape numpy batches, DataInfo) for this process."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise errors.BadValue(f"global_batch={global_batch} is not divisible by the {count} processes")
    if data_cfg.on_too_long not in ("truncate", "drop"):
        raise errors.BadValue(f"data.on_too_long={data_cfg.on_too_long!r}: expected 'truncate' or 'drop'")
    image_root = data_cfg.get("image_root") or None
    if image_root is not None and not Path(image_root).is_dir():
        raise errors.BadValue(f"data.image_root={image_root!r} is not a folder")
    batch_size, ids = global_batch // count, SpecialIds.of(tokenizer, data_cfg.num_img_tokens)
    caption_dir = data_cfg.get("caption_tokenizer") or None
    caption_tok = load_clip_tokenizer(caption_dir) if caption_dir else None
    encoder, parts, weights, num_records = None, [], [], {}
    for k, (path, weight) in enumerate(sources(data_cfg.path)):
        if path.endswith(".arrayrecord"):
            raw = arrayrecord.open_source(path)
            ds = grain.MapDataset.source(raw).map_with_index(arrayrecord.indexed)  # (position, raw) as the others
        else:
            raw = read_records(path)
            ds = grain.MapDataset.source(raw)
        num_records[path] = len(raw)
        ds = ds[index::count]
        if not len(ds):
            raise errors.BadValue(f"{path}: no records for process {index} of {count}")
        if train:
            ds = ds.shuffle(seed=seed + k).repeat()
        encoder = Encoder(tokenizer, ids, Path(path).parent, data_cfg.max_len, data_cfg.image_size,
                          data_cfg.num_patches, data_cfg.target_image_size, data_cfg.on_too_long,
                          Path(image_root).resolve() if image_root else None, data_cfg.get("max_image_pixels"),
                          caption_tok, data_cfg.get("caption_max_len", 77), path,
                          packed=path.endswith(".arrayrecord"))
        parts.append(ds.map(encoder))
        weights.append(weight)
    ds = grain.MapDataset.mix(parts, weights) if train else grain.MapDataset.concatenate(parts)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=2 * batch_size))
    collate = functools.partial(_collate, batch_size=batch_size, blank=encoder.blank())
    it = _SkipCounting(it).batch(batch_size, drop_remainder=train, batch_fn=collate)
    if data_cfg.worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    counts = DataCounts()
    info = DataInfo(data_cfg.max_len, global_batch, batch_size, len(tokenizer), ids, num_records, counts)
    return iter(_Count(it, counts)), info
