"""Converter CLI: file to file, a tensor at a time (`convert.stream`).

    python -m convert mistral --from-hf HF_DIR --out OUR_DIR   # HF folder -> our config.json + params/
    python -m convert mistral --to-hf OUR_DIR --out HF_DIR     # ours -> HF config.json + safetensors (+ index)

The stored dtype is the source's unless `--dtype` says otherwise; the HF config records it as torch_dtype.
A failure prints one line naming the file or key and exits with status 2 (`--verbose` adds the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from genllava_jax import errors

PARTS = ("mistral", "siglip", "clip", "projector", "qformer", "unet", "vae", "inception", "dino")
FILE_PARTS = ("inception",)  # --from-hf may be a bare weights file (pytorch-fid's .pth)


def _dtype(name: str) -> str:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    import numpy as np

    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "f":
        raise argparse.ArgumentTypeError(f"{name!r} is not a floating-point dtype (e.g. float32, bfloat16)")
    return dtype.name


def main(argv=None) -> int:
    """`python -m convert` and the genllava-convert console script: user errors as one line, status 2."""
    return errors.guard(_main, argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=PARTS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="import a Hugging Face folder")
    src.add_argument("--to-hf", metavar="OUR_DIR", help="export one of our checkpoints")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", type=_dtype, default=None, help="parameter dtype of the output (default: as stored)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard on export")
    p.add_argument("--overwrite", action="store_true")
    errors.add_verbose(p)
    a = p.parse_args(argv)

    from pathlib import Path

    from . import stream

    src = a.from_hf or a.to_hf
    bare_file = a.from_hf and a.part in FILE_PARTS and Path(src).is_file()
    if not (Path(src).is_dir() or bare_file):
        raise errors.MissingFile(f"--{'from-hf' if a.from_hf else 'to-hf'} {src}: no such folder")

    conv = importlib.import_module(f".{a.part}", __package__)
    if a.from_hf:
        stored = stream.import_hf(conv.hf_source, a.from_hf, a.out, a.part, dtype=a.dtype, overwrite=a.overwrite)
    else:
        stream.export_checkpoint(a.to_hf, a.out, conv.layout, part=a.part, dtype=a.dtype,
                                 max_shard_bytes=int(a.max_shard_size * 2**30), overwrite=a.overwrite)
        stored = a.dtype or "as stored"
    print(f"wrote {a.out} ({stored})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
