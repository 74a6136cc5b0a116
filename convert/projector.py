"""The LLaVA projector (`model.mm_projector.0/2.*`, Linear -> GELU -> Linear) <-> our `Projector`.

    python -m convert projector --from-hf LLAVA_DIR --out OUR_DIR
    python -m convert projector --to-hf OUR_DIR --out HF_DIR
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from genllava_jax.models.projector import Projector, ProjectorConfig

from .common import COPY, LINEAR, Layout, Rule, Source, TensorReader, load_state, read_json, with_prefix
from .stream import export_module


PREFIX = "model.mm_projector."
RULES = tuple(Rule(f"{i}.{w}", f"{fc}/{o}", t) for i, fc in ((0, "fc1"), (2, "fc2"))
              for w, o, t in (("weight", "kernel", LINEAR), ("bias", "bias", COPY)))


def hf_source(path, *, prefix: str = PREFIX, **overrides) -> Source:
    """The projector of a LLaVA folder (config.json with mm_hidden_size / hidden_size); other keys are ignored."""
    path = Path(path)
    cfg = ProjectorConfig.from_hf(read_json(path / "config.json"), **overrides)
    abstract = nnx.eval_shape(lambda: Projector(cfg, rngs=nnx.Rngs(0)))
    return Source(TensorReader(path), with_prefix(RULES, prefix), abstract, lambda k: not k.startswith(prefix))


def from_hf(path, mesh=None, *, prefix: str = PREFIX, **overrides) -> Projector:
    """Loads the projector from a LLaVA folder."""
    return load_state(hf_source(path, prefix=prefix, **overrides), mesh)


def layout(model: Projector, prefix: str = PREFIX) -> Layout:
    return Layout(with_prefix(RULES, prefix), model.cfg.to_hf())


def to_hf(model: Projector, path, *, prefix: str = PREFIX, dtype=None, max_shard_bytes: int = 5 * 2**30,
          overwrite: bool = False) -> None:
    """Writes the projector's keys in LLaVA layout and a config.json with its LLaVA fields."""
    export_module(model, layout(model, prefix), path, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  overwrite=overwrite)
