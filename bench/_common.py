"""Shared helpers of the benchmark scripts (stdlib only: runs in both venvs)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def machine() -> dict:
    """nproc, CPU model, load average and the int8 dot-product extension: enough to compare
    two runs honestly (`vnni`: x86 ONNX Runtime's uint8 × int8 kernels saturate without it,
    so the peers' int8 accuracy of bench/ptq_vs_ort.py and int_inference.py depends on it)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as fh:  # the first processor's entry: its name, then its flags
            for line in fh:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    model = model or platform.processor() or "unknown"
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg": [round(v, 2) for v in os.getloadavg()],
            "python": sys.version.split()[0], "vnni": bool(flags & VNNI_FLAGS) if flags else None}


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
