"""The training loop: shard, step, watch the loss, log, checkpoint, stop cleanly.

The host never waits for a step: the next batch is placed on the devices while the
current step runs, every loss is checked finite on the device, and metrics cross to
the host once per ``log_every`` steps (those of step ``s`` after step ``s + 1`` has
been dispatched) and before each checkpoint, where everything up to the saved step
is checked finite first: a NaN/Inf loss is never saved, and is reported at the next
fetch with the first step it appeared at.  Step numbers are the state's ``step``
after the update (1-based), the same numbers the checkpoints carry.

A stop signal makes every process of the job save the same step and raise
``Preempted`` (see ``_StopRule``): one process stops after the step it is running;
several stop at the step JAX's preemption sync manager agrees on, with no host sync
per step.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bnfree_jax.data.storage import append_text
from bnfree_jax.train.checkpoint import (Checkpointer, PreemptionGuard, post_preemption_notice,
                                         preemption_guard, preemption_sync_available)
from bnfree_jax.train.mesh import replicated, shard_batch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the state of that step was not saved."""

    def __init__(self, phase: str, step: int, value: float = float("nan")):
        self.phase, self.step, self.value = phase, int(step), value
        super().__init__(f"non-finite loss ({value}) at step {step} of phase '{phase}'; "
                         "not saved, the last good checkpoint is kept")


class Preempted(RuntimeError):
    """A stop signal arrived; the state was saved at ``step`` before raising."""

    def __init__(self, phase: str, step: int, signal_name: str | None = None):
        self.phase, self.step, self.signal_name = phase, int(step), signal_name
        super().__init__(f"stopped by {signal_name or 'request'} at step {step} of phase "
                         f"'{phase}' after saving a checkpoint")


PEER_NOTICE = "another process's stop notice"  # Preempted.signal_name where the signal landed elsewhere

# Training steps this process has run, over all phases: the step id of the preemption
# sync, the same on every process (they run the same phases from the same checkpoints),
# where a phase's own step restarts and could skip the agreed point.
_STEPS_RUN = itertools.count(1)


def _any_process(flag: bool) -> bool:
    """``flag`` or-ed over all processes (a host sync when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class _StopRule:
    """Whether to stop after a step: the same answer on every process, at the same step.

    One process: as soon as the guard is up (no host sync).  Several: at the step that
    JAX's preemption sync manager agrees on.  Its per-step check is local (a lock);
    the agreement (every process's step id, max + 1) happens once, in the background,
    after the process that caught the signal posts the notice.  At a phase's last step
    the processes also agree directly (one allgather, next to the final save's own
    barriers), so a notice that came too late for the sync point still stops this
    phase.  Without the sync manager (``jax_enable_preemption_service`` off) they
    agree directly at log points only, since each check is a host sync.
    """

    def __init__(self, guard: PreemptionGuard, num_steps: int, log_every: int):
        self.guard, self.num_steps, self.log_every = guard, num_steps, max(log_every, 1)
        self.multi = jax.process_count() > 1
        self.synced = self.multi and preemption_sync_available()
        self.posted = False

    def __call__(self, step: int) -> bool:
        final = step == self.num_steps
        if not self.multi:
            return self.guard.requested
        if not self.synced:
            return (final or step % self.log_every == 0) and _any_process(self.guard.requested)
        if self.guard.requested and not self.posted:
            post_preemption_notice()
            self.posted = True
        from jax.experimental import multihost_utils
        if multihost_utils.reached_preemption_sync_point(next(_STEPS_RUN)):
            return True
        return final and _any_process(self.guard.requested)


def _fetch(tree: Any) -> Any:
    """The one device→host fetch of the loop (a host sync): wrapped by tests to count them."""
    return jax.device_get(tree)


@jax.jit
def _watch(seen: tuple, step: jax.Array, loss: jax.Array) -> tuple:
    """On device: (the first step whose loss was not finite, that loss), or (0, 0)."""
    bad_step, bad_loss = seen
    first = (bad_step == 0) & ~jnp.isfinite(loss)
    return jnp.where(first, step, bad_step), jnp.where(first, loss, bad_loss)


def _no_bad_step(mesh: Mesh) -> tuple:
    """`_watch`'s starting value, made on the mesh (no host→device transfer)."""
    return jax.jit(lambda: (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)),
                   out_shardings=replicated(mesh))()


class _NextBatch:
    """The next step's batch, placed on the devices while the current step runs.

    Two batches are on the devices at a time: the running step's and the next one. The
    next is pulled only after the stop rule and the checkpoint of the current step have
    run, so a checkpoint's data position and the step a stop signal lands on are those
    of a loop without prefetch."""

    def __init__(self, batches: Iterable[dict], mesh: Mesh, phase: str, num_steps: int):
        self.it: Iterator[dict] = iter(batches)
        self.mesh, self.phase, self.num_steps = mesh, phase, num_steps
        self.placed: dict | None = None

    def fill(self, step: int) -> None:
        """Pull and place the batch of `step` (nothing past the last step)."""
        if step > self.num_steps:
            return
        try:
            local = next(self.it)
        except StopIteration:
            raise RuntimeError(f"batches ran out before step {step} of phase "
                               f"'{self.phase}' (num_steps={self.num_steps})") from None
        self.placed = shard_batch(local, self.mesh)

    def take(self) -> dict:
        batch, self.placed = self.placed, None
        return batch


class _Progress:
    """A ``rich`` bar (step/s, loss, ETA) on process 0, or nothing."""

    def __init__(self, enabled: bool, phase: str, start: int, total: int):
        self.bar = None
        if not enabled or jax.process_index() != 0:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[rate]} step/s"),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[chip]}"),
                            TimeRemainingColumn())
        self.task = self.bar.add_task(phase, total=total, completed=start,
                                      rate="-", loss="-", chip="")
        self.bar.start()

    def update(self, step: int, loss: float, rate: float, rates: dict | None = None) -> None:
        if self.bar is not None:
            chip = ""
            if rates:
                chip = f"{rates['images_per_s_per_chip']:.0f} img/s/chip"
                chip += f" MFU {100 * rates['mfu']:.1f} %" if "mfu" in rates else ""
            self.bar.update(self.task, completed=step, loss=f"{loss:.4g}", rate=f"{rate:.2f}", chip=chip)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_loop(*, step_fn: Callable, state: Any, frozen: Any, batches: Iterable[dict],
             mesh: Mesh, num_steps: int, checkpointer: Checkpointer | None = None,
             data_iterator: Any = None, extra: dict | None = None,
             metrics_path: str | os.PathLike | None = None, phase: str = "train",
             log_every: int = 50, progress: bool = True,
             on_metrics: Callable[[dict], None] | None = None, probe: Any = None,
             diagnostics: Callable | None = None) -> Any:
    """Run ``step_fn(state, frozen, batch)`` from ``state.step`` up to ``num_steps``.

    ``state`` and ``frozen`` should already be on the mesh (``phase.on_mesh``): only
    batches cross host→device here.  ``batches`` yields this process's local numpy
    batches; ``data_iterator`` (often the same object) provides ``get_state()`` for
    checkpoints.  Saves every ``checkpointer.save_every`` steps and at the end (with
    ``extra`` plus ``phase`` and the data state); writes JSON lines ``{"phase", "step",
    "loss", ...}`` every ``log_every`` steps and at the end (process 0); calls
    ``on_metrics(record)`` for every record it fetches (those steps and the checkpoints').

    Nothing syncs the host per step: the losses are watched on the device and the
    metrics are fetched once per ``log_every`` steps (one step late, while the next one
    runs) and before each checkpoint, so a NaN/Inf loss is detected at the next fetch,
    and always before a save.  Raises ``Preempted`` after saving (and waiting for the
    save) on SIGTERM/SIGINT/SIGHUP, at the same step on every process when only some of
    them got the signal, and ``NonFiniteLoss`` (without saving; naming the first
    non-finite step) on a NaN/Inf loss.  Returns the final state.

    ``probe`` (``telemetry.PhaseProbe``) sees each step before and after its dispatch
    (the step's FLOPs, a profiler trace) and every fetched record (rates, MFU, the
    TensorBoard scalars); it adds no host sync but the end of a traced range.

    ``diagnostics(state, frozen, batch) -> {key: scalar}`` (``diagnostics.make_diagnostics``)
    runs on a log step's state and batch just before the step, and its values join that
    step's record: only the written records carry them, the step itself is unchanged.
    """
    start = int(np.asarray(jax.device_get(state.step)))
    if start >= num_steps:
        return state
    every = max(log_every, 1)
    write = metrics_path is not None and jax.process_index() == 0
    bar = _Progress(progress, phase, start, num_steps)
    t0, t0_step = time.perf_counter(), start
    feed = _NextBatch(batches, mesh, phase, num_steps)
    seen = _no_bad_step(mesh)
    pending: tuple[int, dict, tuple] | None = None  # (step, its metrics, `seen` after it), on device

    def flush() -> None:
        """Fetch the pending step's metrics (one host sync), check the losses, log them."""
        nonlocal pending
        if pending is None:
            return
        step, dev_metrics, dev_seen = pending
        pending = None
        (bad_step, bad_loss), metrics = _fetch((dev_seen, dev_metrics))
        if int(bad_step):
            raise NonFiniteLoss(phase, int(bad_step), float(bad_loss))
        record = {"phase": phase, "step": step, "time": round(time.time(), 3),
                  **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        if on_metrics is not None:
            on_metrics(record)
        rates = probe.on_record(record) if probe is not None else None
        rate = (step - t0_step) / max(time.perf_counter() - t0, 1e-9)
        bar.update(step, record["loss"], rate, rates)
        if write and (step % every == 0 or step == num_steps):
            append_text(metrics_path, json.dumps(record) + "\n")

    def save(step: int, force: bool) -> None:
        meta = dict(extra or {}, phase=phase)
        if data_iterator is not None:
            meta["data"] = data_iterator.get_state()
        checkpointer.save(step, state, meta, force=force)

    try:
        with preemption_guard() as guard:
            should_stop = _StopRule(guard, num_steps, log_every)
            feed.fill(start + 1)
            for step in range(start + 1, num_steps + 1):
                batch = feed.take()
                if probe is not None:
                    probe.before_step(step, step_fn, state, frozen, batch)
                logged = step % every == 0 or step == num_steps
                diag = diagnostics(state, frozen, batch) if diagnostics is not None and logged else {}
                state, dev_metrics = step_fn(state, frozen, batch)
                dev_metrics = {**dev_metrics, **diag}
                del batch
                if probe is not None:
                    probe.after_step(step, state)
                seen = _watch(seen, state.step, dev_metrics["loss"])
                flush()  # a log step's metrics, one step late: while this step runs
                stop = should_stop(step)
                saving = checkpointer is not None and (stop or step == num_steps
                                                       or checkpointer.should_save(step))
                if saving or stop or logged:
                    pending = (step, dev_metrics, seen)
                if saving:
                    flush()  # everything up to the saved step checked finite first
                    save(step, force=stop or step == num_steps)
                if stop:
                    flush()
                    if checkpointer is not None:  # on disk before the notice period ends
                        checkpointer.wait()
                    raise Preempted(phase, step, guard.signal_name or PEER_NOTICE)
                feed.fill(step + 1)  # placed while this step runs
            flush()
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state
