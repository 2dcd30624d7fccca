"""Evaluation, one copy: exact top-1 across devices and hosts, and batched outputs of any
function of images on one process (fake-quant logits, pre-activations, layer errors)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax import data as data_lib
from bnfree_jax.train.mesh import put_replicated, shard_batch
from bnfree_jax.train.step import make_eval_step


def evaluate_top1(apply_fn, params, model_state, frozen, feed, mesh) -> float:
    """Top-1 of `apply_fn(params, model_state, frozen, images) -> logits` on the feed's
    evaluation split, every example counted once (padding masked) on every host."""
    eval_step = make_eval_step(apply_fn, mesh)
    params, model_state, frozen = put_replicated((params, model_state, frozen), mesh)
    batch = feed.eval_batch - feed.eval_batch % mesh.size or mesh.size
    correct = count = 0
    for b in data_lib.eval_batches(feed.eval_source, batch_size=batch // jax.process_count(),
                                   image_size=feed.image_size):
        out = eval_step(params, model_state, frozen, shard_batch(b, mesh))
        correct += int(out["correct"])
        count += int(out["count"])
    return correct / max(count, 1)


def batched_outputs(fn: Callable[[Any, jax.Array], Any], variables, images: np.ndarray,
                    batch: int = 1000) -> Any:
    """`fn(variables, images)` jitted over batches of `images` and concatenated (numpy);
    the last batch is padded to full size so the function compiles once."""
    jfn = jax.jit(fn)
    parts = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        n = len(x)
        if n < batch and len(images) > batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        parts.append(jax.tree.map(lambda a: np.asarray(a)[:n], jfn(variables, jnp.asarray(x))))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
