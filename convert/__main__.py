"""Converter CLI.

    python -m convert mistral --from-hf HF_DIR --out OUR_DIR   # HF folder -> our config.json + orbax params
    python -m convert mistral --to-hf OUR_DIR --out HF_DIR     # ours -> HF config.json + safetensors (+ index)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from genllava_jax import errors

PARTS = ("mistral", "siglip", "clip", "projector", "qformer", "unet", "vae", "inception", "dino")
FILE_PARTS = ("inception",)  # --from-hf may be a bare weights file (pytorch-fid's .pth)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=PARTS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="import a Hugging Face folder")
    src.add_argument("--to-hf", metavar="OUR_DIR", help="export one of our checkpoints")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="parameter dtype of the output (default: as stored)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard on export")
    p.add_argument("--overwrite", action="store_true")
    errors.add_verbose(p)
    a = p.parse_args(argv)

    from pathlib import Path

    from genllava_jax import checkpoint

    src = a.from_hf or a.to_hf
    bare_file = a.from_hf and a.part in FILE_PARTS and Path(src).is_file()
    if not (Path(src).is_dir() or bare_file):
        raise errors.MissingFile(f"--{'from-hf' if a.from_hf else 'to-hf'} {src}: no such folder")

    conv = importlib.import_module(f".{a.part}", __package__)
    if a.from_hf:
        overrides = {"param_dtype": a.dtype} if a.dtype else {}
        module = conv.from_hf(a.from_hf, **overrides)
        checkpoint.save_module(a.out, module, a.part, overwrite=a.overwrite)
    else:
        module = checkpoint.load_module(a.to_hf)
        conv.to_hf(module, a.out, dtype=a.dtype, max_shard_bytes=int(a.max_shard_size * 2**30),
                   overwrite=a.overwrite)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.guard(main))
