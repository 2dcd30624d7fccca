"""Train one phase to its budget, resumably: checkpoints in the phase's own directory,
resume from the newest readable one (data position included), then the loop.

Resume has one copy, here. A fresh phase's starting point (`start`, e.g. a closed-form
fit) is computed only when no checkpoint is readable and is saved at step 0 before the
first step, so a kill at any instant reruns into the same trajectory: it never redoes
the start on top of a resumed state, nor skips it."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from bnfree_jax.train.checkpoint import Checkpointer, abstract_like
from bnfree_jax.train.diagnostics import make_diagnostics
from bnfree_jax.train.loop import run_loop
from bnfree_jax.train.mesh import replicated
from bnfree_jax.train.step import make_train_step
from bnfree_jax.train.telemetry import PhaseProbe


def on_mesh(state, mesh):
    """`state` as global arrays replicated on the mesh (what orbax saves on every host);
    a jitted identity accepts host-local and typed-key leaves as the training step does."""
    return jax.jit(lambda s: s, out_shardings=replicated(mesh))(state)


def restore_data_position(batches, saved: dict, log, phase: str) -> None:
    """Resume the input stream where it was; a position saved under another host layout
    (process count, batch) cannot be mapped onto this one: say so and start a fresh
    deterministic shuffle instead of failing the resume."""
    try:
        batches.set_state(saved)
    except ValueError as e:
        log(f"[{phase}] parameters, optimizer state and step restored; the data position was not "
            f"({e}); continuing with a fresh shuffle from the seed")


def resume(ckpt: Checkpointer, like_state, rt, phase: str, batches=None) -> Optional[tuple[Any, dict, int]]:
    """(state, extra, step) from the newest readable checkpoint, the data position put
    back into `batches`; None when the phase has no readable checkpoint."""
    restored = ckpt.restore_latest(abstract_like(like_state, rt.mesh))
    if restored is None:
        return None
    state, extra, step = restored
    rt.log(f"[{phase}] resuming at step {step}")
    if batches is not None and extra and "data" in extra:
        restore_data_position(batches, extra["data"], rt.log, phase)
    return state, extra, step


def train_phase(phase: str, ckpt_dir, like_state, frozen, loss_fn, tx, batches, steps: int, rt,
                start: Optional[Callable[[], tuple[Any, dict]]] = None,
                lr: Optional[Callable[[int], Any]] = None) -> tuple[Any, dict]:
    """Run `phase` to `steps` steps; returns (final state, the phase's `extra` record).

    `like_state` gives the state's structure (and is the fresh state when `start` is
    None); `start() -> (state, extra)` builds a fresh phase's state and its record; `lr`,
    the optimizer's schedule (of the update count), is logged with the metrics.
    The state and `frozen` (what the phase does not train: the teacher, a frozen prefix,
    frozen T' groups) are placed on the mesh once, replicated as the step expects, so
    only batches cross host→device per step."""
    ckpt = Checkpointer(ckpt_dir, save_every=rt.save_every, keep=rt.keep, log=rt.log)
    try:
        found = resume(ckpt, like_state, rt, phase, batches)
        if found is not None:
            state, saved, _ = found
            extra = dict(saved.get("record", {}))
        elif start is not None:
            state, extra = start()
            state = on_mesh(state, rt.mesh)
            ckpt.save(0, state, {"phase": phase, "record": extra, "data": batches.get_state()}, force=True)
        else:
            state, extra = on_mesh(like_state, rt.mesh), {}
        if steps > 0:
            step_fn = make_train_step(loss_fn, tx, rt.mesh, compute_dtype=rt.compute_dtype)
            diagnostics = (make_diagnostics(loss_fn, rt.mesh, compute_dtype=rt.compute_dtype)
                           if rt.grad_diagnostics else None)
            probe = PhaseProbe(phase, rt.mesh, rt.events, rt.profile_steps,
                               rt.profile_dir and f"{rt.profile_dir}/{phase}", lr=lr)
            try:
                state = run_loop(step_fn=step_fn, state=state, frozen=on_mesh(frozen, rt.mesh), batches=batches,
                                 mesh=rt.mesh, num_steps=steps, checkpointer=ckpt, data_iterator=batches,
                                 extra={"phase": phase, "record": extra}, metrics_path=rt.metrics_path,
                                 phase=phase, log_every=rt.log_every, probe=probe, diagnostics=diagnostics)
            finally:
                probe.close()
    finally:
        ckpt.close()
        close = getattr(batches, "close", None)
        if close is not None:  # stop the reader threads now, not at interpreter exit
            close()
    return state, extra
