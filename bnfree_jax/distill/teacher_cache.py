"""The original teacher's outputs per training example, computed once, so that stage and
fine-tune steps read their targets instead of running the teacher forward.

Valid only when a training input is a function of its example id (`data.augment ==
"none"`): the teacher is frozen, so its logits and its post-BN output at layer ℓ are then
fixed per example. One inference pass over this process's shard fills the cache; the
logits (N × classes) are always kept, layer targets from the last layer backwards while
they fit `ptl.target_cache_mb` (a stage reading a cached target runs no teacher layer at
all; the late layers are the ones whose targets cost a whole teacher forward). Batches
carry their example ids (`index`), and `CachedBatches` attaches `t_logits` and `t_target`
to each batch on the host, so the step's inputs stay sharded like the images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from bnfree_jax.data import example_batches, shard_ids


@dataclasses.dataclass
class TeacherCache:
    ids: np.ndarray  # sorted example ids of this process's shard
    logits: np.ndarray  # [n, classes] float32
    targets: dict  # layer ℓ (1-based) -> [n, ...] float32 post-BN output of the teacher

    def rows(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, ids)
        if np.any(pos >= len(self.ids)) or np.any(self.ids[np.minimum(pos, len(self.ids) - 1)] != ids):
            raise KeyError("batch holds examples outside this process's cached shard")
        return pos

    @property
    def nbytes(self) -> int:
        return self.logits.nbytes + sum(t.nbytes for t in self.targets.values())


def cached_layers(target_shapes: Sequence[tuple], num_examples: int, budget_mb: float) -> list[int]:
    """Layers ℓ (1-based) whose float32 targets fit the budget, taken from the last layer
    backwards: those stages would otherwise run the longest teacher prefix."""
    left, chosen = budget_mb * 2 ** 20, []
    for l in range(len(target_shapes), 0, -1):
        size = 4 * num_examples * int(np.prod(target_shapes[l - 1]))
        if size > left:
            break
        chosen.append(l)
        left -= size
    return sorted(chosen)


def build_teacher_cache(teacher_net, teacher_vars, source, *, budget_mb: float, batch_size: int = 500,
                        image_size: Optional[int] = None, ids: Optional[np.ndarray] = None,
                        progress=None) -> TeacherCache:
    """One inference pass of the teacher over `ids` (default: this process's training shard).

    Runs on this process's first device with no collective, so every process of a
    multi-host job fills its own shard's cache independently."""
    ids = shard_ids(len(source)) if ids is None else np.sort(np.asarray(ids, np.int64))
    _, first = next(example_batches(source, ids[:1], batch_size=1, image_size=image_size))
    shapes = [t[1].shape[1:] for t in jax.eval_shape(
        lambda v, x: teacher_net.apply(v, x, train=False, capture=True)[1], teacher_vars, first)]
    layers = cached_layers(shapes, len(ids), budget_mb)
    device = jax.local_devices()[0]
    variables = jax.device_put(teacher_vars, device)

    @jax.jit
    def forward(v, x):
        logits, trace = teacher_net.apply(v, x, train=False, capture=True)
        return logits, [trace[l - 1][1] for l in layers]

    logits, targets = [], {l: [] for l in layers}
    for chunk, images in example_batches(source, ids, batch_size=batch_size, image_size=image_size):
        out_logits, outs = jax.device_get(forward(variables, jax.device_put(images, device)))
        logits.append(np.asarray(out_logits, np.float32))
        for l, t in zip(layers, outs):
            targets[l].append(np.asarray(t, np.float32))
        if progress is not None:
            progress(len(chunk))
    return TeacherCache(ids=ids, logits=np.concatenate(logits),
                        targets={l: np.concatenate(v) for l, v in targets.items()})


class CachedBatches:
    """Wraps a training iterator: each batch gains `t_logits` and, when layer ℓ is cached,
    `t_target`; the iterator position (get/set_state) and close() are the wrapped one's."""

    def __init__(self, batches, cache: TeacherCache, layer: int = 0):
        self.batches, self.cache = batches, cache
        self.layer = layer if layer in cache.targets else 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self.batches))
        rows = self.cache.rows(batch["index"])
        batch["t_logits"] = self.cache.logits[rows]
        if self.layer:
            batch["t_target"] = self.cache.targets[self.layer][rows]
        return batch

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
