"""Shared helpers of the benchmark scripts (stdlib only: runs in both venvs)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time


def machine() -> dict:
    """nproc, CPU model and load average: enough to compare two runs honestly."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg": [round(v, 2) for v in os.getloadavg()],
            "python": sys.version.split()[0]}


def time_per_call(fn, *, repeats: int, inner: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median seconds per call of `fn()` (which must block until its work is done) over
    `repeats` timed runs of `inner` calls each, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t0) / inner)
    return statistics.median(runs), runs


def rate(batch: int, seconds: float) -> float:
    return round(batch / seconds, 2)


def emit(result: dict) -> None:
    """The final JSON line every script prints (run_all.sh reads the last line)."""
    print(json.dumps(result, sort_keys=True), flush=True)
