"""Image preprocessing equal to `transformers.SiglipImageProcessor` (its PIL backend), NHWC for our towers.

RGB conversion (transparency composited onto white, as HF does; grey, palette, CMYK and 16-bit modes through PIL),
resize to the model size with PIL's filter, rescale by 1/255 in float64 then float32, normalise in float32: the
same operations in the same order, so the result is bit-identical to HF's `pixel_values` transposed to (H, W, 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    size: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ImageConfig":
        """From a `preprocessor_config.json` dict; missing fields take SigLIP's defaults."""
        kw = {k: hf[k] for k in ("resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize")
              if hf.get(k) is not None}
        size = hf.get("size")
        if isinstance(size, int):
            kw["size"] = (size, size)
        elif size is not None:
            if set(size) != {"height", "width"}:
                raise ValueError(f"size={size!r}: only {{'height', 'width'}} is supported")
            kw["size"] = (size["height"], size["width"])
        for k in ("image_mean", "image_std"):
            if hf.get(k) is not None:
                v = hf[k]
                kw[k] = tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3
        return cls(**kw)


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image; transparent pixels (alpha band or palette transparency) become white."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image | np.ndarray, cfg: ImageConfig = ImageConfig()) -> np.ndarray:
    """(H, W, 3) float32 pixel values from a PIL image or a uint8 (H, W[, C]) array."""
    image = to_rgb(image)
    if cfg.do_resize:
        height, width = cfg.size
        image = image.resize((width, height), resample=cfg.resample)
    x = np.asarray(image)
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x.astype(np.float32)
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x
