"""Writes a tiny dataset in the imagenet2012 TFDS feature format (ArrayRecord), for
running the ImageNet input pipeline without the real 150 GB dataset, and a miniature
ILSVRC2012 source (the files `bnfree prepare imagenet2012` reads, with the real set's quirks)."""

from __future__ import annotations

import functools
import io
import pathlib

import numpy as np
from PIL import Image


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tiny_images(n: int, seed: int) -> list[np.ndarray]:
    """Smooth random RGB images of varied sizes and aspect ratios (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(48, 97)), int(rng.integers(48, 97))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(60, 190, size=3)
        img = (base + 40 * np.sin(xx[..., None] / rng.uniform(4, 12) + rng.uniform(0, 6, 3))
               + 40 * np.cos(yy[..., None] / rng.uniform(4, 12) + rng.uniform(0, 6, 3)))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def write_tiny_imagenet(data_dir: str | pathlib.Path, n_train: int = 12,
                        n_val: int = 7) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Builds `imagenet2012` (JPEG, varied sizes, labels unique per split) under
    `data_dir`; returns the decoded (image, label) pairs written, per split."""
    splits = {
        "train": [(img, 7 * k % 1000) for k, img in enumerate(tiny_images(n_train, 0))],
        "validation": [(img, 13 * k % 1000) for k, img in enumerate(tiny_images(n_val, 1))],
    }
    _write("imagenet2012", data_dir, splits, "file_name", jpeg=True)
    # What a reader gets back: the JPEG-decoded pixels, not the originals.
    return {s: [(np.asarray(Image.open(io.BytesIO(jpeg_bytes(img))).convert("RGB")), label)
                for img, label in items] for s, items in splits.items()}


# Four real classes with their indices in the standard (sorted) 1000-class order.
WNIDS = {"n01440764": 0, "n01443537": 1, "n01751748": 65, "n04596742": 909}
IMAGENET_PER_CLASS = (3, 2)  # train, validation images per class


def encode_quirk(img: np.ndarray, kind: str) -> bytes:
    """The odd files of the real set: a CMYK JPEG ('cmyk'), a PNG under a .JPEG name
    ('png'), grayscale ('gray'); 'rgb' is an ordinary JPEG."""
    pil = Image.fromarray(img)
    if kind == "cmyk":
        pil = pil.convert("CMYK")
    elif kind == "gray":
        pil = pil.convert("L")
    buf = io.BytesIO()
    pil.save(buf, format="PNG" if kind == "png" else "JPEG", quality=95)
    return buf.getvalue()


@functools.cache
def imagenet_miniature() -> dict[str, list[tuple[str, str, np.ndarray, str, bytes]]]:
    """{split: [(file_name, wnid, original RGB pixels, kind, file bytes)]}: the four
    quirk kinds spread over classes and splits, validation files named as the real ones."""
    kinds = ["cmyk", "png", "gray", "rgb"]
    n_train, n_val = IMAGENET_PER_CLASS
    images = iter(tiny_images(len(WNIDS) * (n_train + n_val), seed=5))
    out = {"train": [], "validation": []}
    number = 0
    for c, wnid in enumerate(WNIDS):
        for k in range(n_train):
            img, kind = next(images), kinds[(c + k) % 4]
            out["train"].append((f"{wnid}_{k + 1}.JPEG", wnid, img, kind, encode_quirk(img, kind)))
        for k in range(n_val):
            number += 1
            img, kind = next(images), kinds[(c + k + 1) % 4]
            out["validation"].append((f"ILSVRC2012_val_{number:08d}.JPEG", wnid, img, kind,
                                      encode_quirk(img, kind)))
    return out


def write_imagenet_extracted(root: str | pathlib.Path) -> pathlib.Path:
    """The miniature in the extracted layout `root/{train,val}/<wnid>/*.JPEG`."""
    root = pathlib.Path(root)
    for split, folder in (("train", "train"), ("validation", "val")):
        for name, wnid, _, _, raw in imagenet_miniature()[split]:
            (root / folder / wnid).mkdir(parents=True, exist_ok=True)
            (root / folder / wnid / name).write_bytes(raw)
    return root


def write_tiny_cifar10(data_dir: str | pathlib.Path, n_train: int = 40,
                       n_test: int = 10) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Builds `cifar10` (PNG 32x32, lossless) under `data_dir`; returns what was written."""
    rng = np.random.default_rng(2)
    splits = {s: [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), k % 10) for k in range(n)]
              for s, n in (("train", n_train), ("test", n_test))}
    _write("cifar10", data_dir, splits, "id", jpeg=False)
    return splits


def _write(name: str, data_dir, splits, id_key: str, jpeg: bool) -> None:
    """Writes `splits` under `data_dir` as dataset `name`, with the features and
    version of the real tfds builder of that name (so `tfds.data_source` reads it)."""
    import tensorflow_datasets as tfds

    data_dir = str(data_dir)
    reference = tfds.builder(name, data_dir=data_dir)
    features, version = reference.info.features, reference.version
    dataset_name = name

    with tfds.core.registered.skip_registration():

        class Tiny(tfds.core.GeneratorBasedBuilder):
            name = dataset_name
            VERSION = version

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=features,
                                             supervised_keys=("image", "label"))

            def _split_generators(self, dl_manager):
                return {s: self._generate_examples(s) for s in splits}

            def _generate_examples(self, split):
                for k, (img, label) in enumerate(splits[split]):
                    key = f"{split}_{k:05d}"
                    image = jpeg_bytes(img) if jpeg else _png_bytes(img)
                    yield key, {"image": image, "label": label, id_key: key}

    Tiny(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_dir=str(pathlib.Path(data_dir) / "downloads"))


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
