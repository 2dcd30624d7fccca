"""What every training run of a job shares, passed down explicitly from the job: the mesh,
where progress and metrics go, the checkpoint policy, how often metrics are fetched and the
compute dtype."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class Runtime:
    mesh: Mesh
    log: Callable[[str], None] = print
    metrics_path: Optional[Any] = None  # metrics.jsonl (process 0 appends)
    save_every: int = 200
    keep: int = 3
    log_every: int = 50  # metrics fetched from the devices and written every this many steps
    compute_dtype: Any = None  # None (float32) or jnp.bfloat16
    events: Any = None  # telemetry.EventLog: TensorBoard scalars of every phase (process 0)
    profile_steps: Optional[tuple[int, int]] = None  # (A, B): a profiler trace of steps A..B of each phase
    profile_dir: Optional[Any] = None  # WORKDIR/profile
    grad_diagnostics: bool = True  # gradient norms, clip fractions, STE cosine at every log step
