"""pytorch-fid's FID Inception weights <-> our `FIDInception` (pool3 features for FID).

    python -m convert inception --from-hf pt_inception-2015-12-05-6726825d.pth --out OUR_DIR
    python -m convert inception --to-hf OUR_DIR --out DIR        # DIR/model.safetensors, the same torch keys

The weights are pytorch-fid's `FID_WEIGHTS_URL` file (a state dict of its `fid_inception_v3()`), which you supply;
a folder holding `model.safetensors` or `pytorch_model.bin` with those keys is read too. Our module tree mirrors the
torch one, so the table is derived from it. The 1008-way classifier (`fc.*`) and BatchNorm's
`num_batches_tracked` do not enter pool3 features and are not kept.
"""

from __future__ import annotations

from flax import nnx

from genllava_jax import layers
from genllava_jax.models import abstract_model
from genllava_jax.models.inception import BatchNorm, FIDInception, InceptionConfig

from .common import CONV, Layout, Rule, Source, TensorReader, load_state
from .stream import export_module


BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def rules(model: nnx.Module) -> tuple[Rule, ...]:
    """The key table (works on abstract models)."""
    out = []
    for path, m in nnx.iter_modules(model):
        prefix = ".".join(str(p) for p in path)
        if isinstance(m, BatchNorm):
            out += [Rule(f"{prefix}.{hf}", "/".join(map(str, path + (ours,)))) for ours, hf in BN_NAMES.items()]
        elif isinstance(m, layers.Conv):
            out.append(Rule(f"{prefix}.weight", "/".join(map(str, path + ("kernel",))), CONV))
    return tuple(out)


def _unused(key: str) -> bool:
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def hf_source(path, **overrides) -> Source:
    """pytorch-fid's FID Inception state dict (a .pth file, read with weights_only=True, or a folder)."""
    cfg = InceptionConfig(**overrides)
    abstract = abstract_model(FIDInception, cfg)
    return Source(TensorReader(path), rules(abstract), abstract, _unused)


def from_hf(path, mesh=None, **overrides) -> FIDInception:
    """Loads pytorch-fid's FID Inception weights (see `hf_source`)."""
    return load_state(hf_source(path, **overrides), mesh)


def layout(model: FIDInception) -> Layout:
    return Layout(rules(model), model.cfg.to_hf())


def to_hf(model: FIDInception, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Writes `path/model.safetensors` with pytorch-fid's keys (no classifier) and a config.json."""
    export_module(model, layout(model), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
