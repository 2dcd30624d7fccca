"""A seeded sample of a source's records, read in evaluation batches: what calibration
(`bnfree ptq`, and activation clips started by calibration) measures ranges on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnfree_jax.data.batches import eval_batches


def sample_indices(total: int, n: int, seed: int) -> np.ndarray:
    """N distinct indices of [0, total) drawn by `seed` (sorted, for sequential reads)."""
    if not 1 <= n <= total:
        raise ValueError(f"a sample of {n} from {total} records")
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


class Subset(Sequence):
    """Some records of a source, by index (keeps `name`, which decides ImageNet's size)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, [int(i) for i in indices]
        self.name = getattr(source, "name", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def sample_batches(source, indices, batch: int, image_size=None):
    """A function yielding the sample's images batch by batch (uint8 NHWC, preprocessed as
    evaluation is), read afresh on each call so that no pass holds them all."""
    subset = Subset(source, indices)

    def batches():
        for b in eval_batches(subset, batch_size=min(batch, len(subset)), process_index=0,
                              process_count=1, image_size=image_size):
            keep = np.asarray(b["mask"]) > 0  # the padded tail of the last batch is no image
            yield np.asarray(b["image"])[keep]
    return batches
