"""A maker's output: one shard per process, append-only, records keyed by id, so a stopped run resumes.

    OUT.jsonl, or OUT-00001-of-00004.jsonl with --num_shards 4   the kept GVIT records (images relative to it)
    ….rejected.jsonl   one line per filtered id: {id, reason, detail, reply}, the LLM's own text, to read
    ….spec.json        what made the shard; resuming with other settings is refused (it would mix two recipes)
    ….report.json      kept and filtered-by-reason counts, rewritten after each chunk
    ….arrayrecord      the kept records with their images embedded, written at the end when asked

Every record is one line written whole and flushed. A rerun reads the ids of both JSONL files (first cutting a torn
last line, left by a kill mid-write), skips them and appends the rest: every id is written once.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Sequence

from genllava_jax import errors
from genllava_jax.atomic import atomic_write


def shard_path(out, shard: int, num_shards: int) -> Path:
    out = Path(out)
    if out.suffix != ".jsonl":
        raise errors.BadValue(f"--out={out}: the output is a .jsonl file")
    if not 0 <= shard < num_shards:
        raise errors.BadValue(f"--shard={shard} is not in [0, --num_shards={num_shards})")
    return out if num_shards == 1 else out.with_name(f"{out.stem}-{shard:05d}-of-{num_shards:05d}.jsonl")


def shard_of(items: Sequence, shard: int, num_shards: int) -> list:
    """This shard's items: every num_shards-th from `shard`, so shards are disjoint and cover the input."""
    return list(items[shard::num_shards])


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + suffix)


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of an append-only file, after cutting a torn last line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    out = []
    for n, line in enumerate(data.decode().splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise errors.BadValue(f"{path}:{n + 1}: not JSON ({e}); this file is not a datagen output") from None
    return out


class Output:
    """The shard's files; `done` holds the ids already written (kept or rejected)."""

    def __init__(self, out, spec: dict, shard: int = 0, num_shards: int = 1):
        self.path = shard_path(out, shard, num_shards)
        self.rejected_path = _sidecar(self.path, ".rejected.jsonl")
        self.spec_path, self.report_path = _sidecar(self.path, ".spec.json"), _sidecar(self.path, ".report.json")
        self.spec = {**spec, "shard": shard, "num_shards": num_shards}
        if self.spec_path.exists():
            old = json.loads(self.spec_path.read_text())
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.spec.items() if old.get(k) != v]
            if diff:
                raise errors.BadValue(f"{self.spec_path}: {self.path} was made with other settings ({'; '.join(diff)});"
                                      f" use another --out or delete its files")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept, rejected = read_lines(self.path), read_lines(self.rejected_path)
        self.counts = collections.Counter({"kept": len(kept)})
        self.counts.update(r["reason"] for r in rejected)
        self.done = {r["id"] for r in kept} | {r["id"] for r in rejected}
        _write_json(self.spec_path, self.spec)
        self._kept, self._rejected = open(self.path, "a"), open(self.rejected_path, "a")

    @property
    def base_dir(self) -> Path:
        """The folder record image paths are relative to."""
        return self.path.parent

    def keep(self, record: dict) -> None:
        self._append(self._kept, record)
        self.counts["kept"] += 1

    def reject(self, id_: str, reason: str, detail: str = "", reply=None) -> None:
        self._append(self._rejected, {"id": id_, "reason": reason, "detail": detail, "reply": reply})
        self.counts[reason] += 1

    def _append(self, f, record: dict) -> None:
        if record["id"] in self.done:
            raise ValueError(f"{record['id']} is written already")  # a maker bug: ids must be unique
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        self.done.add(record["id"])

    def report(self) -> dict:
        filtered = {k: v for k, v in sorted(self.counts.items()) if k != "kept" and v}
        kept = self.counts["kept"]
        return {"kept": kept, "filtered": filtered, "total": kept + sum(filtered.values())}

    def checkpoint(self, extra: dict | None = None) -> dict:
        """Flushes to disk and rewrites the report."""
        for f in (self._kept, self._rejected):
            f.flush()
            os.fsync(f.fileno())
        report = {**self.report(), **(extra or {})}
        _write_json(self.report_path, report)
        return report

    def close(self, arrayrecord: bool = False, image_root=None) -> None:
        self._kept.close()
        self._rejected.close()
        if arrayrecord:
            from genllava_jax.data import arrayrecord as ar

            counts = ar.write(self.path, self.path.with_suffix(".arrayrecord"), root=image_root)
            if set(counts) - {"written"}:
                raise errors.Stopped(f"{self.path}: records the training pipeline would skip: {dict(counts)}")


def _write_json(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def totals(out) -> dict:
    """Kept and filtered-by-reason counts summed over every shard of `out` (one or many)."""
    out = Path(out)
    paths = sorted(out.parent.glob(f"{out.stem}-*-of-*.report.json")) or [_sidecar(out, ".report.json")]
    total = collections.Counter()
    for p in paths:
        if p.exists():
            r = json.loads(p.read_text())
            total["kept"] += r["kept"]
            total.update(r["filtered"])
    filtered = {k: v for k, v in sorted(total.items()) if k != "kept"}
    return {"kept": total["kept"], "filtered": filtered, "total": total["kept"] + sum(filtered.values())}
