"""Per-example image preprocessing on uint8 HWC numpy arrays (PIL for resizing).

Every random choice comes from the `np.random.Generator` passed in, so the
pipeline decides determinism (it seeds one per example from seed, epoch and
example index). Outputs stay uint8: normalisation is folded into the model.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

AUGMENTS = ("none", "crop_flip", "imagenet")
EVAL_CROP_FRACTION = 0.875  # the usual 224/256 centre crop


def _resize_box(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crops `box` = (x0, y0, x1, y1) of `image` and resizes it to size×size (bilinear)."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR, box=box), np.uint8)
    return out.reshape(size, size, channels)


def flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Zero-pads by `pad` on each side, then takes a random crop of the original size."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    y0, x0 = rng.integers(0, 2 * pad + 1, size=2)
    return padded[y0:y0 + h, x0:x0 + w]


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
    """Inception-style crop box (x0, y0, x1, y1): area fraction in `scale`, aspect in
    `ratio` (log-uniform); falls back to the largest centred box within `ratio`."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            return x0, y0, x0 + cw, y0 + ch
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return x0, y0, x0 + cw, y0 + ch


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    return _resize_box(image, random_resized_crop_box(h, w, rng), size)


def center_crop(image: np.ndarray, size: int,
                crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
    """Central square of side `crop_fraction`·min(h, w), resized to size×size.

    Equivalent to resizing the short side to size/crop_fraction then cropping
    size×size, in a single resampling. Images already size×size pass through.
    """
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    side = max(1, int(round(min(h, w) * crop_fraction)))
    y0, x0 = (h - side) // 2, (w - side) // 2
    return _resize_box(image, (x0, y0, x0 + side, y0 + side), size)


def train_preprocess(image: np.ndarray, augment: str, rng: np.random.Generator,
                     image_size: int | None) -> np.ndarray:
    """One training image: 'none' (centre crop only if a size is asked and differs),
    'crop_flip' (CIFAR: pad 4, random crop, flip), 'imagenet' (random resized crop, flip)."""
    if augment == "none":
        return image if image_size is None else center_crop(image, image_size)
    if augment == "crop_flip":
        if image_size is not None and image.shape[:2] != (image_size, image_size):
            image = center_crop(image, image_size)
        return flip(pad_crop(image, rng), rng)
    if augment == "imagenet":
        if image_size is None:
            raise ValueError("augment='imagenet' needs an image_size")
        return flip(random_resized_crop(image, image_size, rng), rng)
    raise ValueError(f"unknown augment {augment!r}; use one of {AUGMENTS}")


def eval_preprocess(image: np.ndarray, image_size: int | None) -> np.ndarray:
    """One evaluation image: centre crop to `image_size` (if given), no randomness."""
    return image if image_size is None else center_crop(image, image_size)
