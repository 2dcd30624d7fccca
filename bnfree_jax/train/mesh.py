"""The 1-D ``('data',)`` device mesh and the helpers that place arrays on it.

Every device of every process joins one data-parallel axis.  Parameters and
optimizer state are replicated; batches are split on their leading axis.  The
same functions work on one CPU, one GPU host, and a multi-host pod after
``jax.distributed.initialize()``: each process feeds only its own share of the
batch, and ``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
PLATFORMS = ("auto", "tpu", "gpu", "cpu")  # mesh.platform; jax's Device.platform names
# How to get the missing JAX build, per expected platform (launch/setup.sh).
_INSTALL_HINT = {"tpu": "install the TPU build with `bash launch/setup.sh --accelerator tpu`",
                 "gpu": "install the CUDA build with `bash launch/setup.sh --accelerator cuda`",
                 "cpu": "run with JAX_PLATFORMS=cpu"}


def use_cpu_devices(n: int) -> None:
    """Split this host's CPU into ``n`` JAX devices (0: leave JAX's default, one unless
    XLA_FLAGS asks for more).

    XLA's CPU convolutions run faster on small batches, so the same global batch split
    over 8 CPU devices trains 1.7× (alexnet_mini) to 2.5× (vgg_plain) faster on a 2-core
    host (bench/scaling_cpu.py);
    the mathematics is the data-parallel step's, equal up to float summation order.
    JAX fixes the device count when its backends start, so this must run before any
    JAX operation; no effect on GPU or TPU devices."""
    if n < 0:
        raise ValueError(f"mesh.cpu_devices={n} must be 0 (JAX's default) or a device count")
    if n == 0 or jax.config.jax_num_cpu_devices == n:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have != n:  # started already, with the count asked for (e.g. by XLA_FLAGS): nothing to do
            raise ValueError(f"mesh.cpu_devices={n}: JAX's backends already started with {have} CPU "
                             "device(s); set it before any JAX operation (a fresh process)") from None


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (default: all global devices)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (DATA_AXIS,))


def check_platform(expected: str, devices: Sequence[jax.Device] | None = None) -> None:
    """Refuse a job whose devices are not the platform its config expects.

    Without the accelerator's JAX build, JAX falls back to the CPU silently and a pod job
    would train there for days; `mesh.platform` makes that one ValueError at the start.
    ``'auto'`` accepts any device; ``devices`` defaults to ``jax.devices()``."""
    if expected not in PLATFORMS:
        raise ValueError(f"mesh.platform={expected!r} must be one of "
                         + ", ".join(repr(p) for p in PLATFORMS))
    if expected == "auto":
        return
    devs = list(jax.devices() if devices is None else devices)
    found = sorted({d.platform for d in devs})
    if expected not in found:
        raise ValueError(f"mesh.platform={expected!r} but JAX found only {'/'.join(found) or 'no'} "
                         f"devices ({len(devs)}); {_INSTALL_HINT[expected]}")


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, frozen trees)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading axis is split across the ``'data'`` axis (batches)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree replicated on the mesh (every process must pass equal values)."""
    return jax.device_put(tree, replicated(mesh))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """Raise a clear ``ValueError`` when the batch cannot be split evenly."""
    n = mesh.size
    if global_batch % n:
        raise ValueError(
            f"global batch {global_batch} is not divisible by {n} devices; "
            f"use a batch size that is a multiple of {n}")


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn this process's share of a batch into global arrays split over ``'data'``.

    The global batch is ``local batch × jax.process_count()``; every leaf must
    have the same leading size.
    """
    sizes = {k: np.shape(v)[0] for k, v in local_batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch leaves disagree on the leading size: {sizes}")
    if not sizes:
        return {}
    local = next(iter(sizes.values()))
    check_batch_divisible(local * jax.process_count(), mesh)
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
