"""The job's data as training sees it: the training source with its augmentation, and the
evaluation source every evaluation of the job reads (test split, or the held-out tail)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from bnfree_jax import data as data_lib
from bnfree_jax.train.mesh import check_batch_divisible


@dataclasses.dataclass(frozen=True)
class Feed:
    train_source: Any
    eval_source: Any
    augment: str = "none"
    image_size: Optional[int] = None  # None: the dataset's native size
    eval_batch: int = 1000
    workers: int = 0  # grain worker processes decoding and augmenting (0: none)
    read_threads: int = 2  # threads reading (and, without workers, decoding) records
    prefetch: int = 4  # batches read ahead

    def train_batches(self, global_batch: int, seed: int, mesh):
        """An endless, checkpointable iterator of this process's share of each batch."""
        check_batch_divisible(global_batch, mesh)
        return data_lib.train_iterator(self.train_source, global_batch=global_batch, seed=seed,
                                       augment=self.augment, image_size=self.image_size,
                                       num_threads=self.read_threads, prefetch_batches=self.prefetch,
                                       num_workers=self.workers)

    def sample_batches(self, n: int, seed: int, batch: int = 256):
        """A function yielding `n` training images drawn by `seed`, batch by batch,
        preprocessed as evaluation is (data/sample.py)."""
        indices = data_lib.sample_indices(len(self.train_source), n, seed)
        return data_lib.sample_batches(self.train_source, indices, batch, self.image_size)

    def eval_arrays(self, n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """The first `n` (default all) evaluation examples as (uint8 NHWC images, int32
        labels), preprocessed exactly as evaluation does (so ImageNet's images of many
        sizes arrive cropped to one shape), read by this process alone."""
        total = len(self.eval_source) if n is None else min(int(n), len(self.eval_source))
        images, labels, got = [], [], 0
        for b in data_lib.eval_batches(self.eval_source, batch_size=max(1, min(self.eval_batch, total or 1)),
                                       process_index=0, process_count=1, image_size=self.image_size):
            keep = np.asarray(b["mask"]) > 0
            images.append(np.asarray(b["image"])[keep])
            labels.append(np.asarray(b["label"])[keep])
            got += int(keep.sum())
            if got >= total:
                break
        if not images:
            raise ValueError("the evaluation split is empty")
        return (np.concatenate(images)[:total].astype(np.uint8, copy=False),
                np.concatenate(labels)[:total].astype(np.int32, copy=False))
