"""One way to write a file or a folder so that a crash never leaves it half-written under its final name.

The temporary path sits beside `out` and is named `.NAME.tmp-PID@HOST-RANDOM`: a run killed mid-write (kill -9,
out of memory) leaves it behind, and the next write of the same `out` removes it and says so (`clean_stale`).
Files appended a line at a time (metrics.jsonl, a sweep's answers) lose a torn last line before they are appended to
again (`cut_torn_line`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from genllava_jax import errors


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def clean_stale(out: Path, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> None:
    """Removes what killed runs left beside `out` (temporary paths named with their process id and host), and puts
    back an old folder a run killed while replacing it had moved aside; reports each, and what it leaves alone (a
    process on another host, or one still running, may own it)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)@(.*)-[^-]*")
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        kind, pid, host = m[1], int(m[2]), m[3]
        if host != socket.gethostname() or _alive(pid):
            log(f"{p}: left alone, it may belong to a running process ({pid} on {host})")
        elif kind == "old" and not out.exists():
            os.replace(p, out)
            log(f"{out}: put back from {p.name}, where a killed run (process {pid}) had moved it")
        else:
            _remove(p)
            log(f"{p}: removed, left by a killed run (process {pid})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(out: str | os.PathLike, *, directory: bool = False, overwrite: bool = True):
    """Yields a temporary path beside `out` (an empty folder if `directory`) that is renamed to `out` only when the
    block finishes; on an error it is removed and `out` is left as it was. `overwrite=False`: `out` must not exist.
    What killed runs left beside `out` is cleaned first; a folder gets the user's umask (mkdtemp's is 0700).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    if out.exists() and not overwrite:
        raise errors.OutputExists(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    tag = f"{os.getpid()}@{socket.gethostname()}"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{tag}-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())
    else:  # beside `out`: the rename stays on one filesystem (atomic); the caller creates it (its usual mode)
        tmp = out.with_name(f".{out.name}.tmp-{tag}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if directory and out.exists():  # a folder cannot be replaced by one rename: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{tag}-", dir=out.parent))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def cut_torn_line(path: str | os.PathLike, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> bool:
    """Cuts a partial last line (a kill mid-append) off a line-per-record file, so that the next append does not glue
    a record onto it; True if there was one."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    os.truncate(path, keep)
    log(f"{path}: cut its torn last line ({len(data) - keep} bytes, written by a run that was killed)")
    return True
