"""Exact test-split top-1 across devices and hosts (padding masked, every example once)."""

from __future__ import annotations

import jax

from bnfree_jax import data as data_lib
from bnfree_jax.train.mesh import put_replicated, shard_batch
from bnfree_jax.train.step import make_eval_step


def evaluate_top1(ctx, apply_fn, params, model_state, frozen, source=None) -> float:
    """Top-1 of `apply_fn(params, model_state, frozen, images) -> logits` on the test split."""
    eval_step = make_eval_step(apply_fn, ctx.mesh)
    params, model_state, frozen = put_replicated((params, model_state, frozen), ctx.mesh)
    batch = ctx.config.data.eval_batch
    batch -= batch % ctx.mesh.size
    correct = count = 0
    for b in data_lib.eval_batches(source or ctx.test_source, batch_size=batch // jax.process_count(),
                                   image_size=ctx.config.data.image_size or None):
        out = eval_step(params, model_state, frozen, shard_batch(b, ctx.mesh))
        correct += int(out["correct"])
        count += int(out["count"])
    return correct / max(count, 1)

