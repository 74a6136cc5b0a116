"""The grain input pipeline: GVIT records -> fixed-shape numpy batches, so the train step compiles once.

    iterator, info = make_dataset(cfg.data, load_tokenizer(cfg.data.tokenizer), global_batch=128, seed=0)
    batch = next(iterator)  # state: iterator.get_state() / set_state(), or grain.checkpoint.CheckpointSave in orbax

A batch (B = this process's rows, T = max_len, H = image_size, Ht = target_image_size):
    input_ids, labels (IGNORE = -100 off the answers; aligned with input_ids, the loss shifts), attention_mask:
    int32 (B, T); image: float32 (B, H, H, 3) SigLIP-preprocessed; target_image, source_image (the edit's input):
    float32 (B, Ht, Ht, 3) in [-1, 1]; has_image, has_target: bool (B,); task: int32 (B,) index into TASKS
    (0 text, 1 i2t, 2 t2i, 3 edit). Absent images are zeros.

Per source: this process's shard (`[process_index::process_count]`), a seeded shuffle, repeated with a new order
each epoch; sources are mixed by weight (grain.MapDataset.mix). Records the step cannot use are skipped, never
fatal, and counted by reason in `info.skipped` (reported from workers too, as the reasons travel with the batches).
With train=False: one pass in file order, the last batch padded with empty rows (attention_mask all 0).
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

from genllava_jax.data import arrayrecord
from genllava_jax.data.image import ImageConfig, preprocess, to_rgb
from genllava_jax.data.records import TASKS, BadRecord, Record, load_image, parse, read_records
from genllava_jax.data.template import GENERATES, IGNORE, encode_conversation
from genllava_jax.data.tokenizer import SpecialIds

MAX_SKIPS_IN_A_ROW = 1000  # more means the data is unusable (wrong folder, ...): fail instead of spinning forever


def default_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # A GVIT .json/.jsonl/.arrayrecord file, "a.jsonl:3,b.arrayrecord:1" (weighted mixture), or, set in a config
        # file, a list of dict(path=..., weight=...).
        path="",
        tokenizer="",  # a local HF tokenizer directory (genllava_jax.data.tokenizer.load_tokenizer)
        max_len=256,  # every sequence is padded or cut to this length
        image_size=224,  # SigLIP input side
        num_patches=256,  # <image> expands to this many positions: (image_size / patch_size) ** 2
        target_image_size=256,  # VAE input side (target and source images)
        num_img_tokens=16,  # [IMG0..N-1]
        on_too_long="truncate",  # or "drop"; a cut that would split the image or [SOI]..[EOI] drops the record
        worker_count=0,  # grain worker processes (0: decode in this process)
        read_threads=2,  # threads decoding records ahead of the consumer
    ))


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

    def __call__(self, raw) -> dict:
        try:
            if isinstance(raw, bytes):
                raw = arrayrecord.unpack(raw)
            return self.example(parse(raw, self.base_dir))
        except BadRecord as e:
            return {"skip": e.reason}

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

    def example(self, record: Record) -> dict:
        input_ids, labels = encode_conversation(self.tokenizer, self.ids, list(record.turns), task=record.task,
                                                num_patches=self.num_patches)
        input_ids, labels = self.fit(input_ids, labels, record.task)
        ex = self.blank()
        n = len(input_ids)
        ex["input_ids"][:n], ex["labels"][:n], ex["attention_mask"][:n] = input_ids, labels, 1
        ex["task"] = np.int32(TASKS.index(record.task))
        if record.image is not None:
            image = load_image(record.image)
            ex["image"] = preprocess(image, ImageConfig(size=(self.image_size,) * 2))
            ex["has_image"] = np.bool_(True)
            if record.task == "edit":
                ex["source_image"] = vae_pixels(image, self.target_size)
        if record.target_image is not None:
            ex["target_image"] = vae_pixels(load_image(record.target_image), self.target_size)
            ex["has_target"] = np.bool_(True)
        return ex

    def blank(self) -> dict:
        """An empty row: what the padding rows of the last eval batch are."""
        t, s, h = self.max_len, self.image_size, self.target_size
        return dict(input_ids=np.full(t, self.ids.pad, np.int32), labels=np.full(t, IGNORE, np.int32),
                    attention_mask=np.zeros(t, np.int32), image=np.zeros((s, s, 3), np.float32),
                    has_image=np.bool_(False), target_image=np.zeros((h, h, 3), np.float32),
                    has_target=np.bool_(False), source_image=np.zeros((h, h, 3), np.float32), task=np.int32(0))


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
                raise RuntimeError(f"{len(reasons)} records in a row were unusable: "
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
    return batch


def _count(batch: dict, *, skipped: collections.Counter) -> dict:
    skipped.update(batch.pop("_skipped"))
    return batch


@dataclasses.dataclass(frozen=True)
class DataInfo:
    max_len: int
    global_batch: int
    batch_size: int  # this process's rows
    vocab_size: int  # len(tokenizer), added tokens included
    special_ids: SpecialIds
    num_records: dict[str, int]  # per source path, before sharding
    skipped: collections.Counter  # reason -> records skipped so far (this process)


def make_dataset(data_cfg: ml_collections.ConfigDict, tokenizer, *, global_batch: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 train: bool = True) -> tuple[grain.DatasetIterator, DataInfo]:
    """(iterator of fixed-shape numpy batches, DataInfo) for this process."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ValueError(f"global_batch={global_batch} is not divisible by the {count} processes")
    if data_cfg.on_too_long not in ("truncate", "drop"):
        raise ValueError(f"data.on_too_long={data_cfg.on_too_long!r}: expected 'truncate' or 'drop'")
    batch_size, ids = global_batch // count, SpecialIds.of(tokenizer, data_cfg.num_img_tokens)
    encoder, parts, weights, num_records = None, [], [], {}
    for k, (path, weight) in enumerate(sources(data_cfg.path)):
        raw = arrayrecord.open_source(path) if path.endswith(".arrayrecord") else read_records(path)
        num_records[path] = len(raw)
        ds = grain.MapDataset.source(raw)[index::count]
        if not len(ds):
            raise ValueError(f"{path}: no records for process {index} of {count}")
        if train:
            ds = ds.shuffle(seed=seed + k).repeat()
        encoder = Encoder(tokenizer, ids, Path(path).parent, data_cfg.max_len, data_cfg.image_size,
                          data_cfg.num_patches, data_cfg.target_image_size, data_cfg.on_too_long)
        parts.append(ds.map(encoder))
        weights.append(weight)
    ds = grain.MapDataset.mix(parts, weights) if train else grain.MapDataset.concatenate(parts)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=2 * batch_size))
    collate = functools.partial(_collate, batch_size=batch_size, blank=encoder.blank())
    it = _SkipCounting(it).batch(batch_size, drop_remainder=train, batch_fn=collate)
    if data_cfg.worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    skipped = collections.Counter()
    it = it.map(functools.partial(_count, skipped=skipped))
    info = DataInfo(data_cfg.max_len, global_batch, batch_size, len(tokenizer), ids, num_records, skipped)
    return iter(it), info
