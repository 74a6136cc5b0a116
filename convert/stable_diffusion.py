"""A whole diffusers Stable Diffusion pipeline folder -> our UNet and VAE checkpoints (+ the null conditioning).

    python -m convert.stable_diffusion SD_DIR OUT_DIR     # writes OUT_DIR/{unet,vae}/ and null_conditioning.npy

Where SD_DIR has text_encoder/ and tokenizer/, CLIP("") is computed with torch exactly as the pipelines encode an
empty negative prompt (padded to the tokenizer's max length) and stored as a (77, D) float32 array: GenLLaVA's
learned null conditioning starts from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from convert import unet as unet_conv, vae as vae_conv
from convert.common import atomic_dir
from genllava_jax import errors

NULL_CONDITIONING = "null_conditioning.npy"


def clip_null_conditioning(sd_dir) -> np.ndarray | None:
    """CLIP text-encoder states of "" as (L, D) float32, or None if the folder has no text encoder + tokenizer."""
    sd_dir = Path(sd_dir)
    if not (sd_dir / "text_encoder" / "config.json").exists() or not (sd_dir / "tokenizer").is_dir():
        return None
    import torch
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(str(sd_dir / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(sd_dir / "text_encoder")).eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0][0].float().numpy()


def from_hf_pipeline(sd_dir, out_dir, *, overwrite: bool = False, **overrides) -> None:
    """Converts `sd_dir`'s unet/ and vae/ into our checkpoints under `out_dir` (see the module docstring)."""
    from genllava_jax import checkpoint

    with atomic_dir(out_dir, overwrite) as tmp:
        checkpoint.save_module(tmp / "unet", unet_conv.from_hf(Path(sd_dir) / "unet", **overrides), "unet")
        checkpoint.save_module(tmp / "vae", vae_conv.from_hf(Path(sd_dir) / "vae", **overrides), "vae")
        null = clip_null_conditioning(sd_dir)
        if null is not None:
            np.save(tmp / NULL_CONDITIONING, null)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.stable_diffusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sd_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default=None, help="parameter dtype of the output (default: float32)")
    p.add_argument("--overwrite", action="store_true")
    errors.add_verbose(p)
    a = p.parse_args(argv)
    from_hf_pipeline(a.sd_dir, a.out_dir, overwrite=a.overwrite, **({"param_dtype": a.dtype} if a.dtype else {}))
    print(f"wrote {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.guard(main))
