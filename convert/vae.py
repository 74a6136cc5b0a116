"""Stable Diffusion VAE: diffusers `AutoencoderKL` folders <-> our `AutoencoderKL`.

    python -m convert vae --from-hf SD_DIR --out OUR_DIR      # a pipeline folder (its vae/) or a bare model folder
    python -m convert vae --to-hf OUR_DIR --out HF_DIR

Keys come from our module paths as for the UNet (`convert.unet.mirror_rules`). Older checkpoints name the mid-block
attention query/key/value/proj_attn; they are read under the current names, as diffusers does.
"""

from __future__ import annotations

import json
import re

from flax import nnx

from genllava_jax.models.vae import AutoencoderKL, VAEConfig

from .common import TensorReader, export_hf, hf_tensors, load_state
from .unet import PREFIX, mirror_rules, model_dir

_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _current_name(key: str) -> str:
    m = _LEGACY_KEY.match(key)
    return f"{m[1]}.{_LEGACY[m[2]]}.{m[3]}" if m else key


def from_hf(path, mesh=None, **overrides) -> AutoencoderKL:
    """Loads a diffusers AutoencoderKL; `overrides` set config fields (dtype, param_dtype)."""
    folder = model_dir(path, "vae")
    cfg = VAEConfig.from_hf(json.loads((folder / "config.json").read_text()), **overrides)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    return load_state(TensorReader(folder, PREFIX, rename=_current_name), mirror_rules(abstract), abstract, mesh)


def to_hf(model: AutoencoderKL, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
          overwrite: bool = False) -> None:
    """Writes a folder that `AutoencoderKL.from_pretrained` loads with no missing or unexpected keys."""
    export_hf(path, model.cfg.to_hf(), hf_tensors(model, mirror_rules(model), dtype), prefix=PREFIX,
              max_shard_bytes=max_shard_bytes, overwrite=overwrite)
