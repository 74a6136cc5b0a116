"""Stable Diffusion UNet: diffusers `UNet2DConditionModel` folders <-> our `UNet`.

    python -m convert unet --from-hf SD_DIR --out OUR_DIR     # a pipeline folder (its unet/) or a bare model folder
    python -m convert unet --to-hf OUR_DIR --out HF_DIR       # config.json + diffusion_pytorch_model.safetensors

Our module tree mirrors diffusers' names, so the key table is derived from the model: one rule a parameter, the key
from its path (with the few renames below), the transform from its layer (conv OIHW <-> HWIO, linear transposed).
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from genllava_jax import errors, layers
from genllava_jax.models import abstract_model
from genllava_jax.models.unet import UNet, UNetConfig

from .common import CONV, COPY, FLAT, Layout, Linear, Rule, Source, TensorReader, load_state, read_json
from .stream import export_module


PREFIX = "diffusion_pytorch_model"  # diffusers' weight file name
# our path component -> diffusers' (torch keeps these in ModuleLists or a Sequential)
RENAMES = {"kernel": "weight", "scale": "weight", "to_out": "to_out.0", "ff_in": "ff.net.0.proj",
           "ff_out": "ff.net.2", "downsample": "downsamplers.0", "upsample": "upsamplers.0"}


def mirror_rules(model: nnx.Module, renames: dict[str, str] = RENAMES) -> tuple[Rule, ...]:
    """The key table of a module whose tree mirrors the torch one (works on abstract models)."""
    rules = []
    for path, m in nnx.iter_modules(model):
        for name in ("kernel", "scale", "bias"):
            if not isinstance(getattr(m, name, None), nnx.Param):
                continue
            ours = "/".join(str(p) for p in path + (name,))
            hf = ".".join(renames.get(str(p), str(p)) for p in path + (name,))
            if isinstance(m, layers.Conv) and name == "kernel":
                transform = CONV
            elif isinstance(m, layers.Linear) and name == "kernel":
                transform = Linear(n_in=len(m.in_shape))
            elif isinstance(m, layers.Linear) and len(m.out_shape) > 1:
                transform = FLAT
            else:
                transform = COPY
            rules.append(Rule(hf, ours, transform))
    return tuple(rules)


def model_dir(path, sub: str) -> Path:
    """`path/sub` for a pipeline folder, else `path` itself (a bare model folder)."""
    path = Path(path)
    folder = path / sub if (path / sub / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise errors.MissingFile(f"{path}: neither a diffusers pipeline with {sub}/config.json nor a model folder")
    return folder


def hf_source(path, **overrides) -> Source:
    """A diffusers UNet (a pipeline folder's unet/ or a model folder); `overrides` set config fields (dtype,
    param_dtype, remat)."""
    folder = model_dir(path, "unet")
    cfg = UNetConfig.from_hf(read_json(folder / "config.json"), **overrides)
    abstract = abstract_model(UNet, cfg)
    return Source(TensorReader(folder, PREFIX), mirror_rules(abstract), abstract)


def from_hf(path, mesh=None, **overrides) -> UNet:
    """Loads a diffusers UNet (see `hf_source`)."""
    return load_state(hf_source(path, **overrides), mesh)


def layout(model: UNet) -> Layout:
    return Layout(mirror_rules(model), model.cfg.to_hf(), PREFIX)


def to_hf(model: UNet, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Writes a folder that `UNet2DConditionModel.from_pretrained` loads with no missing or unexpected keys."""
    export_module(model, layout(model), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
