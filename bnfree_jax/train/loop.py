"""The training loop: shard, step, watch the loss, log, checkpoint, stop cleanly.

Metrics of step ``s`` are fetched after step ``s + 1`` has been dispatched, so
the host never stalls the device, except at checkpoints, where everything up
to the saved step is checked finite first: a NaN/Inf loss is never saved.
Step numbers are the state's ``step`` after the update (1-based), the same
numbers the checkpoints carry.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from bnfree_jax.train.checkpoint import Checkpointer, preemption_guard
from bnfree_jax.train.mesh import shard_batch


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


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _to_host(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


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
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        self.task = self.bar.add_task(phase, total=total, completed=start,
                                      rate="-", loss="-")
        self.bar.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4g}", rate=f"{rate:.2f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_loop(*, step_fn: Callable, state: Any, frozen: Any, batches: Iterable[dict],
             mesh: Mesh, num_steps: int, checkpointer: Checkpointer | None = None,
             data_iterator: Any = None, extra: dict | None = None,
             metrics_path: str | os.PathLike | None = None, phase: str = "train",
             log_every: int = 50, progress: bool = True,
             on_metrics: Callable[[dict], None] | None = None) -> Any:
    """Run ``step_fn(state, frozen, batch)`` from ``state.step`` up to ``num_steps``.

    ``batches`` yields this process's local numpy batches; ``data_iterator``
    (often the same object) provides ``get_state()`` for checkpoints.  Saves
    every ``checkpointer.save_every`` steps and at the end (with ``extra`` plus
    ``phase`` and the data state); writes JSON lines ``{"phase", "step",
    "loss", ...}`` every ``log_every`` steps and at the end (process 0); calls
    ``on_metrics(record)`` for every step.  Raises ``Preempted`` after saving on
    SIGTERM/SIGINT and ``NonFiniteLoss`` (without saving) on a NaN/Inf loss.
    Returns the final state.
    """
    start = int(np.asarray(jax.device_get(state.step)))
    if start >= num_steps:
        return state
    it: Iterator[dict] = iter(batches)
    write = metrics_path is not None and jax.process_index() == 0
    if write:
        os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
    bar = _Progress(progress, phase, start, num_steps)
    t0, t0_step = time.perf_counter(), start
    pending: tuple[int, dict] | None = None

    def flush() -> None:
        """Fetch the pending step's metrics, check them, log them."""
        nonlocal pending
        if pending is None:
            return
        step, dev_metrics = pending
        pending = None
        record = {"phase": phase, "step": step, "time": round(time.time(), 3), **_to_host(dev_metrics)}
        if not math.isfinite(record["loss"]):
            raise NonFiniteLoss(phase, step, record["loss"])
        if on_metrics is not None:
            on_metrics(record)
        rate = (step - t0_step) / max(time.perf_counter() - t0, 1e-9)
        bar.update(step, record["loss"], rate)
        if write and (step % max(log_every, 1) == 0 or step == num_steps):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step: int, force: bool) -> None:
        meta = dict(extra or {}, phase=phase)
        if data_iterator is not None:
            meta["data"] = data_iterator.get_state()
        checkpointer.save(step, state, meta, force=force)

    try:
        with preemption_guard() as guard:
            for step in range(start + 1, num_steps + 1):
                try:
                    local = next(it)
                except StopIteration:
                    raise RuntimeError(f"batches ran out before step {step} of phase "
                                       f"'{phase}' (num_steps={num_steps})") from None
                batch = shard_batch(local, mesh)
                state, dev_metrics = step_fn(state, frozen, batch)
                flush()  # the previous step, while this one runs
                pending = (step, dev_metrics)
                poll = step % max(log_every, 1) == 0 or step == num_steps
                if jax.process_count() == 1:
                    stop = guard.requested
                else:  # agree across hosts, at log points only (it is a host sync)
                    stop = poll and _any_process(guard.requested)
                if checkpointer is not None and (stop or step == num_steps
                                                 or checkpointer.should_save(step)):
                    flush()
                    save(step, force=stop or step == num_steps)
                if stop:
                    flush()
                    raise Preempted(phase, step, guard.signal_name)
            flush()
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state
