"""grain input pipelines: an endless, sharded, checkpointable training iterator and
an exact, deadlock-free sharded evaluation pass.

Training: each process owns a fixed strided shard of the examples (shard p holds
ids p, p + P, p + 2P, ... of the first N − N mod P, so every shard has the same
length and all processes cross epoch boundaries at the same step). The shard is
reshuffled every epoch by grain (deterministic from the seed), and batches are read
with one batched source call. Augmentation draws from a generator seeded by
(seed, epoch, example id), so it does not depend on threads, workers or batch size.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import grain
import numpy as np

from bnfree_jax.data.augment import AUGMENTS, eval_preprocess, train_preprocess
from bnfree_jax.data.info import DEFAULT_IMAGENET_SIZE


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    return int(process_index), int(process_count)


def _image_size(source, image_size: int | None, augment: str | None = None) -> int | None:
    """Explicit size, else ImageNet's default for ImageNet, else native size (None)."""
    if image_size:
        return int(image_size)
    if augment == "imagenet" or getattr(source, "name", None) == "imagenet2012":
        return DEFAULT_IMAGENET_SIZE
    return None


def _read(source, ids) -> list:
    ids = [int(i) for i in ids]
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(ids))
    return [source[i] for i in ids]


def _derive_seed(*words: int) -> int:
    """A uint32 seed from non-negative integers (grain's shuffle takes < 2**32)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0])


def _with_position(pos: int, local: int) -> tuple[int, int]:
    """Pairs a shard position with its stream position (which gives the epoch)."""
    return pos, local


class _TrainBatch:
    """Reads and augments one batch of (stream position, shard position) pairs.

    A class, not a closure, so grain worker processes can unpickle it.
    """

    def __init__(self, source, augment, image_size, seed, process_index, process_count,
                 shard_len):
        self.source, self.augment, self.image_size, self.seed = source, augment, image_size, seed
        self.process_index, self.process_count, self.shard_len = (
            process_index, process_count, shard_len)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        positions, local = batch
        ids = self.process_index + self.process_count * np.asarray(local, np.int64)
        images, labels = [], []
        for pos, i, rec in zip(positions, ids, _read(self.source, ids)):
            rng = np.random.default_rng([self.seed, int(pos) // self.shard_len, int(i)])
            images.append(train_preprocess(rec["image"], self.augment, rng, self.image_size))
            labels.append(rec["label"])
        return {"image": np.stack(images).astype(np.uint8, copy=False),
                "label": np.asarray(labels, np.int32),
                "index": ids.astype(np.int32)}  # example ids: keys of per-example caches


class TrainIterator:
    """Endless iterator of local batches with a JSON-serialisable position.

    `get_state()` → {'grain': <grain iterator state>, plus the configuration that
    gives the state its meaning}; `set_state()` refuses a state taken under another
    seed, batch, process count or dataset length, since it would silently resume
    on different data.
    """

    def __init__(self, dataset: grain.IterDataset, config: dict[str, Any]):
        self._dataset = dataset
        self._iter = iter(dataset)
        self.config = dict(config)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iter.get_state(), **self.config}

    def set_state(self, state: dict[str, Any]) -> None:
        mismatch = {k: (state.get(k), v) for k, v in self.config.items() if state.get(k) != v}
        if mismatch:
            raise ValueError(f"iterator state does not match this pipeline (saved, now): {mismatch}")
        self._iter.set_state(state["grain"])

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def train_iterator(source, *, global_batch: int, seed: int, augment: str = "none",
                   process_index: int | None = None, process_count: int | None = None,
                   image_size: int | None = None, num_threads: int = 2,
                   prefetch_batches: int = 4, num_workers: int = 0) -> TrainIterator:
    """Endless iterator of {'image': uint8 [B, H, W, C], 'label': int32 [B], 'index': int32 [B]
    (example ids)}, B = global_batch
    // process_count, over this process's shard, reshuffled each epoch from `seed`.

    `augment`: 'none' | 'crop_flip' | 'imagenet'. `num_threads` reading threads (0:
    read in the caller), `num_workers` > 0 adds grain worker processes.
    """
    pi, pc = _process_shard(process_index, process_count)
    if global_batch <= 0 or global_batch % pc:
        raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                         f"process_count={pc}")
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; use one of {AUGMENTS}")
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    n = len(source)
    shard_len = n // pc
    if shard_len == 0:
        raise ValueError(f"{n} examples cannot be sharded over {pc} processes")
    local_batch = global_batch // pc
    size = _image_size(source, image_size, augment)

    ds = grain.MapDataset.range(shard_len).shuffle(seed=_derive_seed(seed, pi, pc))
    ds = ds.repeat(None)  # reshuffles each epoch
    ds = ds.map_with_index(_with_position)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(_TrainBatch(source, augment, size, int(seed), pi, pc, shard_len))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        _absl_flags_ready()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    config = {"seed": int(seed), "global_batch": int(global_batch), "process_count": pc,
              "num_examples": n, "augment": augment, "image_size": size,
              "num_workers": int(num_workers)}  # worker iterators keep another state format
    return TrainIterator(it_ds, config)


def shard_ids(num_examples: int, process_index: int | None = None,
              process_count: int | None = None) -> np.ndarray:
    """The example ids `train_iterator` gives this process (sorted)."""
    pi, pc = _process_shard(process_index, process_count)
    return pi + pc * np.arange(num_examples // pc, dtype=np.int64)


def example_batches(source, ids, *, batch_size: int, image_size: int | None = None,
                    num_threads: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, uint8 images) of the given examples in order, preprocessed as `train_iterator`
    does with augment='none': the inputs a per-example cache is computed from."""
    ids = np.asarray(ids, np.int64)
    size = _image_size(source, image_size)

    def read(b: int):
        chunk = ids[b * batch_size:(b + 1) * batch_size]
        images = [train_preprocess(r["image"], "none", None, size) for r in _read(source, chunk)]
        return chunk, np.stack(images).astype(np.uint8, copy=False)

    num_batches = math.ceil(len(ids) / batch_size)
    ds = grain.MapDataset.range(num_batches).map(read)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)))


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside an absl app they are
    unparsed, so accept their defaults (as `absl.app.run` would with no argv)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _EvalBatch:
    """Batch b of this process's contiguous shard, padded to batch_size (mask 0)."""

    def __init__(self, source, start, count, batch_size, image_size, image_shape):
        self.source, self.start, self.count = source, start, count
        self.batch_size, self.image_size, self.image_shape = batch_size, image_size, image_shape

    def __call__(self, b: int) -> dict[str, np.ndarray]:
        lo = min(b * self.batch_size, self.count)
        hi = min(lo + self.batch_size, self.count)
        image = np.zeros((self.batch_size, *self.image_shape), np.uint8)
        label = np.zeros((self.batch_size,), np.int32)
        mask = np.zeros((self.batch_size,), np.int32)
        records = _read(self.source, range(self.start + lo, self.start + hi))
        for k, rec in enumerate(records):
            image[k] = eval_preprocess(rec["image"], self.image_size)
            label[k] = rec["label"]
            mask[k] = 1
        return {"image": image, "label": label, "mask": mask}


def eval_batches(source, *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, image_size: int | None = None,
                 num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `source`: {'image', 'label', 'mask'} batches of exactly batch_size.

    Process p reads a contiguous shard; the last batch is padded (mask 0) and every
    process yields the same number of batches (fully masked ones if its shard is
    shorter), so collective evaluation steps never deadlock. The mask sums to
    len(source) over all processes.
    """
    pi, pc = _process_shard(process_index, process_count)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(source)
    base, extra = divmod(n, pc)
    start, count = pi * base + min(pi, extra), base + (1 if pi < extra else 0)
    num_batches = math.ceil((base + (1 if extra else 0)) / batch_size)
    if num_batches == 0:
        return iter(())
    size = _image_size(source, image_size)
    shape = eval_preprocess(source[0]["image"], size).shape
    ds = grain.MapDataset.range(num_batches).map(
        _EvalBatch(source, start, count, batch_size, size, shape))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=2)))
