"""One file a part: mistral, siglip, clip, qformer, unet, vae, genllava.

REGISTRY maps a part name to (module, config class, model class): what our checkpoints record in `config.json`
so that `genllava_jax.checkpoint.load_module` can rebuild the model abstractly and restore it onto a mesh.
"""

import importlib

REGISTRY = {
    "mistral": ("genllava_jax.models.mistral", "MistralConfig", "Mistral"),
    "unet": ("genllava_jax.models.unet", "UNetConfig", "UNet"),
    "vae": ("genllava_jax.models.vae", "VAEConfig", "AutoencoderKL"),
    "qformer": ("genllava_jax.models.qformer", "QFormerHeadConfig", "QFormerHead"),
    "siglip": ("genllava_jax.models.siglip", "SiglipVisionConfig", "SiglipVision"),
    "projector": ("genllava_jax.models.projector", "ProjectorConfig", "Projector"),
    "clip": ("genllava_jax.models.clip", "CLIPConfig", "CLIP"),
    "inception": ("genllava_jax.models.inception", "InceptionConfig", "FIDInception"),
    "dino": ("genllava_jax.models.dino", "ViTConfig", "DinoViT"),
}


def lookup(part: str):
    """(config class, model class) for a part name."""
    if part not in REGISTRY:
        raise KeyError(f"unknown part {part!r}; known parts: {sorted(REGISTRY)}")
    mod, cfg_name, model_name = REGISTRY[part]
    m = importlib.import_module(mod)
    return getattr(m, cfg_name), getattr(m, model_name)


def abstract_model(model_cls, cfg):
    """`model_cls(cfg)` as nnx.eval_shape builds it: shapes, dtypes and sharding names, nothing allocated.

    Built without an nnx.Rngs where the model allows it (its layers are not stacked: stack_layers splits one): under
    eval_shape every key drawn from an Rngs makes flax ask the traced counter for its sharding, and the error text JAX
    composes for that grows with the trace (the SD UNet's abstract build: 33 s of 36 s on this CPU). The parameters'
    values are never computed, so which keys they would use does not matter.
    """
    from flax import nnx

    try:
        return nnx.eval_shape(lambda: model_cls(cfg, rngs=None))
    except (AttributeError, TypeError, ValueError):  # stacked layers need a real Rngs (a real error recurs below)
        return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
