"""One way to write a file or a folder so that a crash never leaves it half-written under its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from genllava_jax import errors


@contextlib.contextmanager
def atomic_write(out: str | os.PathLike, *, directory: bool = False, overwrite: bool = True):
    """Yields a temporary path beside `out` (an empty folder if `directory`) that is renamed to `out` only when the
    block finishes; on an error it is removed and `out` is left as it was. `overwrite=False`: `out` must not exist.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise errors.OutputExists(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:  # beside `out`: the rename stays on one filesystem (atomic); the caller creates it (its usual mode)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if directory and out.exists():  # a folder cannot be replaced by one rename: move the old one aside first
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
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
