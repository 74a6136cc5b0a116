"""GVIT records with their images embedded, in ArrayRecord: random access into sets too large for one JSON file.

    python -m genllava_jax.data.arrayrecord --src data.jsonl --out data.arrayrecord

An entry is the GVIT record with `image` / `target_image` replaced by the image file's bytes (as stored: PNG, JPEG,
...), packed with msgpack (bytes natively, no pickle). Records that would be skipped in training (malformed, missing
or corrupt image, ...) are left out and counted. The pipeline reads a path ending .arrayrecord with `open_source`.
"""

from __future__ import annotations

import collections
from pathlib import Path

import grain
import msgpack
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter

from genllava_jax import errors
from genllava_jax.atomic import atomic_write
from genllava_jax.data.records import BadRecord, as_dict, load_image, log_skip, parse, read_records, where

IMAGE_KEYS = ("image", "target_image")


def pack(record: dict) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


def unpack(data: bytes) -> dict:
    try:
        return msgpack.unpackb(data, raw=False)
    except UnicodeDecodeError as e:
        raise BadRecord("not_utf8", f"a msgpack string: {e}") from None
    except Exception as e:  # msgpack raises ValueError, FormatError, StackError, ExtraData, ... on arbitrary bytes
        raise BadRecord("malformed", f"not a msgpack record: {type(e).__name__}: {e}") from None


def indexed(index: int, data: bytes) -> tuple[int, bytes]:
    """(position, raw) as the pipeline's sources give them (a plain function: grain workers pickle it)."""
    return index, data


def open_source(path: str | Path) -> grain.sources.ArrayRecordDataSource:
    if not Path(path).is_file():
        raise errors.MissingFile(f"data file {str(path)!r} does not exist")
    return grain.sources.ArrayRecordDataSource(str(path))


def embed(raw: str | dict, base_dir: Path, root: Path | None = None) -> dict:
    """The record as a dict with its image files' bytes in place of their paths; BadRecord if it would be skipped.
    Image paths must resolve inside `root` (default: `base_dir`), as the pipeline's data.image_root."""
    out = dict(as_dict(raw))
    record = parse(out, base_dir, root)
    for key in IMAGE_KEYS:
        ref = getattr(record, key)
        if ref is not None:
            load_image(ref)  # fails now on a missing or corrupt file rather than in training
            out[key] = ref if isinstance(ref, bytes) else Path(ref).read_bytes()
    return out


def write(src: str | Path, out: str | Path, root: str | Path | None = None) -> collections.Counter:
    """Converts a GVIT .json/.jsonl file; returns the counts of written and skipped (by reason) records. `root`:
    the folder image paths must stay inside (default: the file's)."""
    counts, base_dir, raws = collections.Counter(), Path(src).parent, read_records(src)
    with atomic_write(out) as tmp:  # a crash never leaves a half-written file under the final name
        writer = ArrayRecordWriter(str(tmp), "group_size:1")  # group_size 1: each record readable on its own
        try:
            for position, raw in raws:
                try:
                    writer.write(pack(embed(raw, base_dir, None if root is None else Path(root).resolve())))
                    counts["written"] += 1
                except Exception as e:  # a record's fault (BadRecord, or an integer msgpack cannot hold) is a skip
                    bad = isinstance(e, BadRecord)
                    reason = e.reason if bad else "encode_error"
                    log_skip(where(src, position), reason, e.detail if bad else f"{type(e).__name__}: {e}")
                    counts[reason] += 1
        finally:
            writer.close()
    return counts


def main(_):
    counts = write(flags.FLAGS.src, flags.FLAGS.out)
    print(f"wrote {counts.pop('written', 0)} records to {flags.FLAGS.out}; skipped: {dict(counts) or 'none'}")


if __name__ == "__main__":  # flags defined here only: the pipeline imports this module
    flags.DEFINE_string("src", None, "GVIT .json or .jsonl file (images relative to it)", required=True)
    flags.DEFINE_string("out", None, "the .arrayrecord file to write", required=True)
    errors.run(main)
