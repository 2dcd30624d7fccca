"""Multi-process start-up: find out how this process was launched and call
``jax.distributed.initialize`` accordingly.

One process is the default and needs nothing.  Sources, in order:

1. explicit env ``BNFREE_COORDINATOR`` / ``BNFREE_NUM_PROCESSES`` / ``BNFREE_PROCESS_ID``
   (optional ``BNFREE_LOCAL_DEVICE_IDS``), as set by ``launch/multiprocess_cpu.sh``;
   CPU collectives then go through gloo;
2. SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``):
   one process per GPU, coordinator on the first node at ``BNFREE_PORT`` (12355);
3. a multi-host Cloud TPU slice: JAX's own auto-detection.

``BNFREE_INIT_TIMEOUT`` and ``BNFREE_HEARTBEAT_TIMEOUT`` (seconds) bound how long a
process waits for missing peers at start-up and how soon a dead peer is noticed.
``plan_from_env`` is pure (env in, plan out) so the detection logic is testable
without starting anything.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")

DEFAULT_PORT = 12355
LOCAL_TIMEOUT_S = 120  # generous: CI machines are small and may be loaded
CLUSTER_INIT_TIMEOUT_S = 300
CLUSTER_HEARTBEAT_S = 100


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list without calling ``scontrol``.

    Handles ``node01``, ``node01,node02``, ``node[01-04]``, ``gpu[3,5-7]``,
    ``a[01-02],b[1-3]`` and ``rack1-n[009-012]``.
    """
    s = nodelist.strip()
    if not s:
        raise ValueError("empty SLURM node list")
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", s)
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    if not first:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return prefix + first


def _int_env(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer") from None


def _ids(raw: str) -> list[int] | None:
    raw = raw.strip()
    return [int(x) for x in raw.split(",") if x.strip()] if raw else None


def _tpu_multihost(env: Mapping[str, str]) -> bool:
    """Whether the env describes a TPU slice spanning several hosts."""
    if env.get("BNFREE_TPU", "") == "1":
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return True
    m = re.fullmatch(r"v\d+[a-z]*(?:litepod)?-(\d+)", env.get("TPU_ACCELERATOR_TYPE", "").strip())
    return bool(m) and int(m.group(1)) > 8  # one host holds at most 8 cores/chips


def plan_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """What ``initialize`` would do for this environment: ``{'source': ..., 'kwargs': {...}}``.

    ``source`` is ``'single'`` (nothing to do), ``'env'``, ``'slurm'`` or ``'tpu'``;
    ``kwargs`` are the arguments for ``jax.distributed.initialize``.
    """
    if env.get("BNFREE_COORDINATOR", "").strip():
        missing = [k for k in ("BNFREE_NUM_PROCESSES", "BNFREE_PROCESS_ID") if not env.get(k, "").strip()]
        if missing:
            raise ValueError(f"BNFREE_COORDINATOR is set but {', '.join(missing)} is not")
        timeout = _int_env(env, "BNFREE_INIT_TIMEOUT", LOCAL_TIMEOUT_S)
        kwargs = dict(coordinator_address=env["BNFREE_COORDINATOR"].strip(),
                      num_processes=_int_env(env, "BNFREE_NUM_PROCESSES", 1),
                      process_id=_int_env(env, "BNFREE_PROCESS_ID", 0),
                      initialization_timeout=timeout,
                      heartbeat_timeout_seconds=_int_env(env, "BNFREE_HEARTBEAT_TIMEOUT", LOCAL_TIMEOUT_S))
        ids = _ids(env.get("BNFREE_LOCAL_DEVICE_IDS", ""))
        if ids is not None:
            kwargs["local_device_ids"] = ids
        if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
            raise ValueError(f"BNFREE_PROCESS_ID={kwargs['process_id']} is outside "
                             f"0..{kwargs['num_processes'] - 1}")
        return {"source": "env", "cpu_collectives": "gloo", "kwargs": kwargs}
    if env.get("SLURM_PROCID", "").strip() and env.get("SLURM_NTASKS", "").strip():
        ntasks = _int_env(env, "SLURM_NTASKS", 1)
        if ntasks > 1:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
            port = _int_env(env, "BNFREE_PORT", DEFAULT_PORT)
            kwargs = dict(coordinator_address=f"{first_host(nodelist)}:{port}",
                          num_processes=ntasks,
                          process_id=_int_env(env, "SLURM_PROCID", 0),
                          initialization_timeout=_int_env(env, "BNFREE_INIT_TIMEOUT",
                                                          CLUSTER_INIT_TIMEOUT_S),
                          heartbeat_timeout_seconds=_int_env(env, "BNFREE_HEARTBEAT_TIMEOUT",
                                                             CLUSTER_HEARTBEAT_S))
            if env.get("SLURM_LOCALID", "").strip():
                kwargs["local_device_ids"] = [_int_env(env, "SLURM_LOCALID", 0)]
            return {"source": "slurm", "kwargs": kwargs}
    if _tpu_multihost(env):
        return {"source": "tpu", "kwargs": dict(
            initialization_timeout=_int_env(env, "BNFREE_INIT_TIMEOUT", CLUSTER_INIT_TIMEOUT_S),
            heartbeat_timeout_seconds=_int_env(env, "BNFREE_HEARTBEAT_TIMEOUT", CLUSTER_HEARTBEAT_S))}
    return {"source": "single", "kwargs": {}}


def _describe(plan: dict[str, Any], already: bool) -> dict[str, Any]:
    import jax

    out = {"source": plan["source"], "already_initialized": already,
           "process_index": jax.process_index(), "process_count": jax.process_count()}
    out.update({k: v for k, v in plan["kwargs"].items()
                if k in ("coordinator_address", "local_device_ids")})
    return out


def initialize(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Join the multi-process job this process belongs to (idempotent).

    Returns ``{'source', 'already_initialized', 'process_index', 'process_count',
    ['coordinator_address', 'local_device_ids']}``.  A single process (no source
    found) initialises nothing.
    """
    import jax

    plan = plan_from_env(os.environ if env is None else env)
    if jax.distributed.is_initialized():
        return _describe(plan, already=True)
    if plan["source"] == "single":
        print("bnfree: --distributed found no coordinator (BNFREE_*, SLURM or TPU env); "
              "running as a single process", file=sys.stderr)
        return _describe(plan, already=False)
    if plan.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", plan["cpu_collectives"])
    jax.distributed.initialize(**plan["kwargs"])
    return _describe(plan, already=False)


def barrier(name: str) -> None:
    """Every process waits here for all the others (nothing to wait for when alone)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], T], barrier_name: str) -> T:
    """``fn()`` on process 0, then on the others once process 0 is done with it.

    For work on a shared filesystem that must not race (writing the pinned config,
    building the dataset): the others then only read what process 0 left complete.
    The barrier is met even when process 0 raises, so no peer is left waiting.
    """
    import jax

    if jax.process_count() == 1:
        return fn()
    try:
        if jax.process_index() == 0:
            return fn()
    finally:
        barrier(barrier_name)
    return fn()


def leave_now(code: int | str | None) -> None:
    """End a failed process of a multi-process job at once, with its own exit status.

    At interpreter exit JAX waits at a shutdown barrier for peers that are still running
    (or blocked in a collective with this process), and may give up with an abort
    (status 134): the real status is lost and the job hangs meanwhile.  A launcher or
    scheduler seeing this exit stops the peers.
    """
    import jax

    if jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if code is None else code if isinstance(code, int) else 1)  # SystemExit's rules
