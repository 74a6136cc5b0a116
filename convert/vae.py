"""Stable Diffusion VAE: diffusers `AutoencoderKL` folders <-> our `AutoencoderKL`.

    python -m convert vae --from-hf SD_DIR --out OUR_DIR      # a pipeline folder (its vae/) or a bare model folder
    python -m convert vae --to-hf OUR_DIR --out HF_DIR

Keys come from our module paths as for the UNet (`convert.unet.mirror_rules`). Older checkpoints name the mid-block
attention query/key/value/proj_attn; they are read under the current names, as diffusers does.
"""

from __future__ import annotations

import re

from genllava_jax.models import abstract_model
from genllava_jax.models.vae import AutoencoderKL, VAEConfig

from .common import Layout, Source, TensorReader, load_state, read_json
from .stream import export_module
from .unet import PREFIX, mirror_rules, model_dir


_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _current_name(key: str) -> str:
    m = _LEGACY_KEY.match(key)
    return f"{m[1]}.{_LEGACY[m[2]]}.{m[3]}" if m else key


def hf_source(path, **overrides) -> Source:
    """A diffusers AutoencoderKL (a pipeline folder's vae/ or a model folder); `overrides` set config fields."""
    folder = model_dir(path, "vae")
    cfg = VAEConfig.from_hf(read_json(folder / "config.json"), **overrides)
    abstract = abstract_model(AutoencoderKL, cfg)
    return Source(TensorReader(folder, PREFIX, rename=_current_name), mirror_rules(abstract), abstract)


def from_hf(path, mesh=None, **overrides) -> AutoencoderKL:
    """Loads a diffusers AutoencoderKL (see `hf_source`)."""
    return load_state(hf_source(path, **overrides), mesh)


def layout(model: AutoencoderKL) -> Layout:
    return Layout(mirror_rules(model), model.cfg.to_hf(), PREFIX)


def to_hf(model: AutoencoderKL, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
          overwrite: bool = False) -> None:
    """Writes a folder that `AutoencoderKL.from_pretrained` loads with no missing or unexpected keys."""
    export_module(model, layout(model), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
