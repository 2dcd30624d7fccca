"""Train one phase to its budget on the shared machinery: checkpoints in the phase's own
directory, resume at the last good one (data position included), then the loop."""

from __future__ import annotations

from pathlib import Path

from bnfree_jax.train.checkpoint import Checkpointer, abstract_like
from bnfree_jax.train.loop import run_loop
from bnfree_jax.train.step import make_train_step


def train_phase(ctx, phase: str, ckpt_dir: Path, state, frozen, loss_fn, tx, batches, steps: int):
    ckpt = Checkpointer(ckpt_dir, save_every=ctx.config.checkpoint.save_every,
                        keep=ctx.config.checkpoint.keep, log=ctx.log)
    try:
        restored = ckpt.restore_latest(abstract_like(state, ctx.mesh))
        if restored is not None:
            state, extra, step = restored
            ctx.log(f"[{phase}] resuming at step {step}")
            if extra and "data" in extra:
                restore_data_position(ctx, phase, batches, extra["data"])
        if steps > 0:
            step_fn = make_train_step(loss_fn, tx, ctx.mesh, compute_dtype=ctx.compute_dtype)
            state = run_loop(step_fn=step_fn, state=state, frozen=frozen, batches=batches, mesh=ctx.mesh,
                             num_steps=steps, checkpointer=ckpt, data_iterator=batches,
                             extra={"phase": phase}, metrics_path=ctx.metrics_path, phase=phase)
    finally:
        ckpt.close()
        close = getattr(batches, "close", None)
        if close is not None:  # stop the reader threads now, not at interpreter exit
            close()
    return state


def restore_data_position(ctx, phase: str, batches, saved: dict) -> None:
    """Resume the input stream where it was; a position saved under another host layout
    (process count, batch) cannot be mapped onto this one: say so and start a fresh
    deterministic shuffle instead of failing the resume."""
    try:
        batches.set_state(saved)
    except ValueError as e:
        ctx.log(f"[{phase}] parameters, optimizer state and step restored; the data position was not "
                f"({e}); continuing with a fresh shuffle from the seed")
