"""Image preprocessing equal to `transformers.SiglipImageProcessor` and `CLIPImageProcessor` (their PIL backend, the
one transformers uses without torchvision), NHWC for our towers.

RGB conversion (transparency composited onto white, as HF does; grey, palette and CMYK through PIL; 16-bit grey
scaled to 8 bits, see `to_rgb`), resize with PIL's filter (to the model size, or CLIP's: the short side to
`shortest_edge`, the long one scaled and floored), CLIP's centre crop (zero-padded where the image is smaller),
rescale by 1/255 in float64 then float32, normalise in float32: the same operations in the same order, so the result
is bit-identical to HF's `pixel_values` transposed to (H, W, 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    size: tuple[int, int] | None = (224, 224)  # (height, width); None with shortest_edge
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    shortest_edge: int | None = None  # resize the short side to this, keeping the aspect ratio (CLIP)
    crop_size: tuple[int, int] | None = None  # (height, width) of the centre crop after resizing (CLIP)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], base: "ImageConfig | None" = None) -> "ImageConfig":
        """From a `preprocessor_config.json` dict; missing fields take `base`'s (default: SigLIP's)."""
        kw = {k: hf[k] for k in ("resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize")
              if hf.get(k) is not None}
        size = hf.get("size")
        if isinstance(size, int):
            kw["size"], kw["shortest_edge"] = (size, size), None
        elif size is not None:
            if set(size) == {"shortest_edge"}:
                kw["size"], kw["shortest_edge"] = None, size["shortest_edge"]
            elif set(size) == {"height", "width"}:
                kw["size"], kw["shortest_edge"] = (size["height"], size["width"]), None
            else:
                raise ValueError(f"size={size!r}: only {{'height', 'width'}} or {{'shortest_edge'}} is supported")
        crop = hf.get("crop_size")
        if hf.get("do_center_crop") is False:
            kw["crop_size"] = None
        elif crop is not None:
            kw["crop_size"] = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        for k in ("image_mean", "image_std"):
            if hf.get(k) is not None:
                v = hf[k]
                kw[k] = tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3
        return dataclasses.replace(base or cls(), **kw)


# CLIPImageProcessor's defaults (OpenAI CLIP's mean and std)
CLIP = ImageConfig(size=None, shortest_edge=224, crop_size=(224, 224),
                   image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))


def clip_image_config(hf: dict[str, Any] | None = None) -> ImageConfig:
    """CLIP's preprocessing from a `preprocessor_config.json` dict (missing fields: CLIPImageProcessor's defaults)."""
    return ImageConfig.from_hf(hf or {}, base=CLIP)


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image; transparent pixels (alpha band or palette transparency) become white.

    16-bit grey (modes I;16*, and I read from a PNG, which has no 32-bit grey) is scaled to 8 bits (PIL's own
    conversion clips it to white). 32-bit integer or float grey (I, F) has no range to scale from: values in
    [0, 255] are taken as they are, others raise ValueError (a skip, `bad_image_mode`).
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        grey = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(grey / 257).clip(0, 255).astype(np.uint8))
    elif image.mode in ("I", "F"):
        grey = np.asarray(image)
        if grey.size and not (np.isfinite(grey).all() and grey.min() >= 0 and grey.max() <= 255):
            raise ValueError(f"{image.mode} (32-bit) values in [{grey.min()}, {grey.max()}]: no known range to "
                             f"scale to 8 bits; save it as 8- or 16-bit")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image | np.ndarray, cfg: ImageConfig = ImageConfig()) -> np.ndarray:
    """(H, W, 3) float32 pixel values from a PIL image or a uint8 (H, W[, C]) array."""
    image = to_rgb(image)
    if cfg.do_resize:
        height, width = cfg.size or short_side_size(image.height, image.width, cfg.shortest_edge)
        image = image.resize((width, height), resample=cfg.resample)
    x = np.asarray(image)
    if cfg.crop_size is not None:
        x = center_crop(x, *cfg.crop_size)
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x.astype(np.float32)
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x


def short_side_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the short side at `shortest_edge` and the long one scaled and floored, as HF's
    `get_resize_output_image_size(default_to_square=False)`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(x_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """HF's centre crop (offsets floored); an image smaller than the crop is first zero-padded around, as HF does."""
    h, w = x_HWC.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return x_HWC[top:top + height, left:left + width]
    nh, nw = max(height, h), max(width, w)
    pad_top, pad_left = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded = np.zeros((nh, nw) + x_HWC.shape[2:], x_HWC.dtype)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = x_HWC
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]
