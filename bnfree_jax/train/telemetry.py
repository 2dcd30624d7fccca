"""What a pod user watches: images/s per chip, step time and MFU of each phase, written to
TensorBoard event files (tensorboardX: no TensorFlow) beside the metrics lines.

The FLOPs of a step are XLA's own count for the compiled step (``cost_analysis()`` of the
per-device program, after partitioning), so MFU needs no hand-derived model FLOPs; a
chip's peak comes from a small table of dense bf16 figures published by the vendors
(no entry, e.g. a CPU: no MFU).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

# Dense bf16 peak FLOP/s per chip (per GPU), from the vendors' data sheets.
PEAK_BF16_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def chip_peak_flops(device_kind: str) -> Optional[float]:
    """The chip's dense bf16 peak FLOP/s for a ``jax.Device.device_kind``, or None."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in kind:
            return peak
    return None


def compiled_flops(jitted, *args) -> Optional[float]:
    """FLOPs of one call of ``jitted(*args)`` on one device, by XLA's cost analysis of the
    compiled program (None when the backend gives none).  Compiling is cached by jit, so
    this costs one lowering; abstract ``jax.ShapeDtypeStruct`` arguments work too."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - a figure for the log, never a reason to fail a job
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


@dataclasses.dataclass
class Throughput:
    """Rates between two logged steps of a phase: images/s (per host and per chip), step
    time and MFU (with the step's per-device FLOPs and the chip's peak)."""

    global_batch: int
    devices: int
    step_flops: Optional[float] = None  # per device
    peak_flops: Optional[float] = None  # per chip
    _last: Optional[tuple[int, float]] = None

    def update(self, step: int, when: float) -> dict[str, float]:
        """The rates since the previous call (empty on the first, or without progress)."""
        last, self._last = self._last, (int(step), float(when))
        if last is None or step <= last[0] or when <= last[1]:
            return {}
        step_s = (when - last[1]) / (step - last[0])
        out = {"step_seconds": step_s, "images_per_s": self.global_batch / step_s,
               "images_per_s_per_chip": self.global_batch / step_s / self.devices}
        if self.step_flops and self.peak_flops:
            out["mfu"] = self.step_flops / step_s / self.peak_flops
        return out


class EventLog:
    """TensorBoard scalars of one job (``WORKDIR/tensorboard``, local or gs://), one run
    per phase; process 0 writes, the others hold nothing."""

    def __init__(self, logdir, enabled: bool = True):
        self.logdir, self.enabled = str(logdir), enabled
        self._writers: dict[str, Any] = {}

    def scalars(self, phase: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled or not values:
            return
        writer = self._writers.get(phase)
        if writer is None:
            from tensorboardX import SummaryWriter

            writer = self._writers[phase] = SummaryWriter(f"{self.logdir}/{phase}", flush_secs=30)
        for key, value in values.items():
            writer.add_scalar(key, float(value), int(step))

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def parse_profile_steps(text: Optional[str]) -> Optional[tuple[int, int]]:
    """`--profile_steps A:B` → (A, B), 1 <= A <= B; None for no profiling."""
    if not text:
        return None
    try:
        a, b = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise ValueError(f"--profile_steps must be A:B (two step numbers), got {text!r}") from None
    if not 1 <= a <= b:
        raise ValueError(f"--profile_steps A:B needs 1 <= A <= B, got {text!r}")
    return a, b


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


class PhaseProbe:
    """One phase's telemetry, driven by the training loop: the step's FLOPs (from the
    first step's compiled program), rates and MFU at every fetched record (to the event
    log and the progress bar), and a profiler trace of steps A..B (``profile``)."""

    def __init__(self, phase: str, mesh, events: Optional[EventLog] = None,
                 profile: Optional[tuple[int, int]] = None, profile_dir=None, lr=None):
        self.phase, self.events, self.profile, self.profile_dir = phase, events, profile, profile_dir
        self.lr = lr  # the optimizer's schedule of the update count, or None
        self.devices = int(mesh.devices.size)
        self.peak = chip_peak_flops(mesh.devices.flat[0].device_kind)
        self.rates: Optional[Throughput] = None
        self.tracing = False

    def before_step(self, step: int, step_fn, state, frozen, batch) -> None:
        if self.rates is None:
            import jax

            global_batch = int(jax.tree.leaves(batch)[0].shape[0])
            # MFU needs a peak: without one (a CPU) the step is not lowered a second time
            flops = compiled_flops(step_fn, *_abstract((state, frozen, batch))) if self.peak else None
            self.rates = Throughput(global_batch, self.devices, flops, self.peak)
        if self.profile is not None and step == self.profile[0] and not self.tracing:
            import jax

            jax.profiler.start_trace(str(self.profile_dir))
            self.tracing = True

    def after_step(self, step: int, state) -> None:
        if self.tracing and self.profile is not None and step >= self.profile[1]:
            import jax

            jax.block_until_ready(state)  # the traced steps' device work, not only their dispatch
            jax.profiler.stop_trace()
            self.tracing = False

    def on_record(self, record: dict) -> dict[str, float]:
        """The rates since the last fetched record; the record's numbers and the rates
        go to the event log. Adds the learning rate of the record's step to the record
        (step k is update k − 1 of the schedule)."""
        if self.lr is not None:
            import jax

            with jax.transfer_guard("allow"):  # a scalar of bookkeeping per logged step, not the step's data
                record["lr"] = float(self.lr(record["step"] - 1))
        rates = self.rates.update(record["step"], record["time"]) if self.rates else {}
        if self.events is not None:
            numbers = {k: v for k, v in record.items() if k not in ("phase", "step", "time")
                       and isinstance(v, (int, float))}
            self.events.scalars(self.phase, record["step"], {**numbers, **rates})
        return rates

    def close(self) -> None:
        if self.tracing:
            import jax

            jax.profiler.stop_trace()
            self.tracing = False
        if self.events is not None:
            self.events.flush()
