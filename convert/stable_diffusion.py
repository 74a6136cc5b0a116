"""A whole diffusers Stable Diffusion pipeline folder -> ours, without torch.

    python -m convert.stable_diffusion SD_DIR OUT_DIR
        # OUT_DIR/unet/ vae/ [text_encoder/ tokenizer/ null_conditioning.npy] scheduler_config.json

unet/, vae/ and the CLIP text_encoder/ become our checkpoints; the tokenizer and the scheduler config are copied, so
`genllava_jax.sd.load(OUT_DIR)` runs text-to-image from the folder alone. Where SD_DIR has a text encoder and a
tokenizer, CLIP("") is computed with our CLIP text tower exactly as the pipelines encode an empty negative prompt
(padded to the tokenizer's max length, no attention mask) and stored as a (77, D) float32 array: GenLLaVA's learned
null conditioning starts from it.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from genllava_jax import errors
from genllava_jax.atomic import atomic_write

from . import clip as clip_conv, unet as unet_conv, vae as vae_conv
from .common import ConversionError
from .stream import import_hf

NULL_CONDITIONING = "null_conditioning.npy"
SCHEDULER_CONFIG = "scheduler_config.json"


def has_text_encoder(sd_dir) -> bool:
    sd_dir = Path(sd_dir)
    return (sd_dir / "text_encoder" / "config.json").exists() and (sd_dir / "tokenizer").is_dir()


def encode_prompts(text_encoder, tokenizer, prompts) -> np.ndarray:
    """(B, 77, D) float32: CLIP text states of the prompts as StableDiffusionPipeline.encode_prompt computes them."""
    from genllava_jax.data.tokenizer import clip_tokens

    ids, _ = clip_tokens(tokenizer, prompts)
    graphdef, state = nnx.split(text_encoder)
    run = jax.jit(lambda s, ids: nnx.merge(graphdef, s).encode_text(ids).last_hidden_state)
    return np.asarray(run(state, ids), np.float32)


def clip_null_conditioning(sd_dir) -> np.ndarray | None:
    """CLIP text-encoder states of "" as (L, D) float32 (our CLIP), or None without text encoder + tokenizer."""
    from genllava_jax.data.tokenizer import load_clip_tokenizer

    if not has_text_encoder(sd_dir):
        return None
    encoder = clip_conv.from_hf(Path(sd_dir) / "text_encoder", towers=("text",))
    return encode_prompts(encoder, load_clip_tokenizer(Path(sd_dir) / "tokenizer"), [""])[0]


def from_hf_pipeline(sd_dir, out_dir, *, dtype: str | None = None, overwrite: bool = False) -> None:
    """Converts `sd_dir` into `out_dir` (see the module docstring), each part streamed a tensor at a time
    (`convert.stream.import_hf`) and stored in `dtype` (default: as the pipeline stores it)."""
    from genllava_jax.data.tokenizer import load_clip_tokenizer

    sd_dir = Path(sd_dir)
    scheduler = sd_dir / "scheduler" / SCHEDULER_CONFIG
    if not sd_dir.is_dir():
        raise errors.MissingFile(f"{sd_dir}: no such folder")
    if not scheduler.exists():
        raise ConversionError(f"{sd_dir}: no scheduler/{SCHEDULER_CONFIG}; is this a diffusers pipeline folder?")
    with atomic_write(out_dir, directory=True, overwrite=overwrite) as tmp:
        for part, source in (("unet", unet_conv.hf_source), ("vae", vae_conv.hf_source)):
            import_hf(source, sd_dir / part, tmp / part, part, dtype=dtype)
        shutil.copy(scheduler, tmp / SCHEDULER_CONFIG)
        if has_text_encoder(sd_dir):
            text_only = functools.partial(clip_conv.hf_source, towers=("text",))
            import_hf(text_only, sd_dir / "text_encoder", tmp / "text_encoder", "clip", dtype=dtype)
            shutil.copytree(sd_dir / "tokenizer", tmp / "tokenizer")
            # in float32 whatever the stored dtype: it initialises a float32 parameter
            null = encode_prompts(clip_conv.from_hf(sd_dir / "text_encoder", towers=("text",)),
                                  load_clip_tokenizer(sd_dir / "tokenizer"), [""])[0]
            np.save(tmp / NULL_CONDITIONING, null)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.stable_diffusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sd_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default=None, help="parameter dtype of the output (default: as stored in SD_DIR)")
    p.add_argument("--overwrite", action="store_true")
    errors.add_verbose(p)
    a = p.parse_args(argv)
    from_hf_pipeline(a.sd_dir, a.out_dir, dtype=a.dtype, overwrite=a.overwrite)
    print(f"wrote {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.guard(main))
