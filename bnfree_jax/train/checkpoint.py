"""Orbax checkpoints of the train state plus a JSON ``extra`` item, and a preemption guard.

A checkpoint step holds two items: ``state`` (params, model_state, opt_state,
step, rng) and ``extra`` (JSON: the data iterator's ``get_state()``, the stage
name, anything else).  Typed PRNG keys are stored as their raw ``key_data``
with the key implementation recorded in ``extra``, so they round-trip exactly.

Restoring walks the steps newest first and falls back to an older step when a
newer one is unreadable (and to no checkpoint at all when none is readable) (orbax's OCDBT store checksums its data, so a garbled
or missing file fails loudly); the unreadable step directories are renamed
``<step>.corrupt`` so later saves of that step do not collide, and the ``log``
callback says what happened.  All processes call every method: orbax writes
shared metadata, and the JSON ``extra``, from the primary host only, so
``extra`` must be the same on every host (e.g. a step-based data position).

A stop signal (SIGTERM, SIGINT, SIGHUP) only raises a flag (``preemption_guard``); with
several processes ``post_preemption_notice`` hands it to JAX's preemption sync manager,
so that every process stops at the same step (see ``train/loop.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from bnfree_jax.data.storage import as_path, move
from bnfree_jax.train.distributed import barrier
from bnfree_jax.train.mesh import replicated

_PRNG_KEY = "__prng_impls__"
_STEP_KEY = "__step__"


def _default_log(msg: str) -> None:
    logging.getLogger(__name__).warning(msg)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def abstract_like(state: Any, mesh: Mesh | None = None) -> Any:
    """``ShapeDtypeStruct`` tree of ``state`` (arrays or structs) to restore into.

    With ``mesh`` every leaf is placed replicated on it; otherwise the leaves'
    own shardings are kept (when they have one).
    """
    def leaf(x):
        sharding = replicated(mesh) if mesh is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(leaf, state)


def _keys_to_data(tree: Any) -> tuple[Any, dict[str, str]]:
    impls: dict[str, str] = {}

    def conv(path, x):
        if _is_key(x):
            impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
            return jax.random.key_data(x)
        return x
    return jax.tree_util.tree_map_with_path(conv, tree), impls


def _abstract_keys_to_data(abstract: Any) -> Any:
    def conv(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                    sharding=getattr(x, "sharding", None))
    return jax.tree.map(conv, abstract)


def _data_to_keys(tree: Any, impls: dict[str, str]) -> Any:
    def conv(path, x):
        impl = impls.get(jax.tree_util.keystr(path))
        return x if impl is None else jax.random.wrap_key_data(x, impl=impl)
    return jax.tree_util.tree_map_with_path(conv, tree)


def _never_preempted(step: int) -> bool:
    """orbax's own preemption check, turned off (see ``Checkpointer.__init__``)."""
    del step
    return False


class Checkpointer:
    """Periodic, optionally asynchronous checkpoints of ``(state, extra)`` in ``directory``.

    ``save_every``: steps between saves (``force=True`` saves regardless);
    ``keep``: how many recent steps stay on disk.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True, log: Callable[[str], None] | None = None):
        self.directory = as_path(directory)
        self.log = log or _default_log
        self.save_every = max(int(save_every), 1)
        # The interval is ours (orbax would also save the very first step it sees).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1,
            enable_async_checkpointing=async_save, create=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))
        # Stops are the training loop's to decide (train/loop.py numbers the preemption sync
        # steps); orbax would also report its checkpoint steps to JAX's sync manager, later
        # from its finalize thread too, and an older step there can move the agreed stop
        # behind a process that is already past it.
        self._mgr.reached_preemption = _never_preempted

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write."""
        return int(step) % self.save_every == 0 and int(step) not in self._mgr.all_steps()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, extra: dict | None = None, *,
             force: bool = False) -> bool:
        """Save ``state`` and the JSON-serialisable ``extra`` at ``step``; True if written."""
        step = int(step)
        if not (force or self.should_save(step)) or step in self._mgr.all_steps():
            return False
        data, impls = _keys_to_data(state)
        meta = dict(extra or {})
        meta[_PRNG_KEY] = impls
        meta[_STEP_KEY] = step
        return bool(self._mgr.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(data), extra=ocp.args.JsonSave(meta))))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore one step into the structure/shardings of ``abstract_state``."""
        out = self._mgr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_keys_to_data(abstract_state)),
            extra=ocp.args.JsonRestore()))
        meta = dict(out["extra"])
        if meta.pop(_STEP_KEY, step) != step:
            raise ValueError(f"checkpoint {step} carries a different step in its metadata")
        state = _data_to_keys(out["state"], meta.pop(_PRNG_KEY, {}))
        return state, meta

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """``(state, extra, step)`` from the newest readable step, or None if there is none.

        An unreadable newer step is reported through ``log``, moved aside, and
        the previous one is tried; when every step is unreadable they are all moved
        aside and None is returned, so the phase starts again from its beginning.
        """
        self.wait()
        self._mgr.reload()
        steps = sorted(self._mgr.all_steps(), reverse=True)
        failed: list[int] = []
        for step in steps:
            try:
                state, extra = self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - any read failure means "corrupt"
                failed.append(step)
                self.log(f"checkpoint step {step} in {self.directory} is unreadable "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                         "falling back to the previous checkpoint")
                continue
            if failed:
                self._quarantine(failed)
                self.log(f"restored checkpoint step {step} instead of the latest "
                         f"step {failed[0]} (unreadable: {failed})")
            return state, extra, step
        if failed:  # nothing readable: start over rather than fail on every rerun
            self._quarantine(failed)
            self.log(f"no readable checkpoint in {self.directory} (unreadable steps {failed}, "
                     "moved aside as <step>.corrupt); starting this phase from its beginning")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Rename unreadable step directories so the run can save those steps again."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                if src.is_dir():
                    dst, n = src.with_name(f"{step}.corrupt"), 0
                    while dst.exists():
                        n += 1
                        dst = src.with_name(f"{step}.corrupt{n}")
                    move(src, dst)
        barrier("bnfree_checkpoint_quarantine")
        self._mgr.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The coordination-service key that XLA's preemption sync manager watches
# (xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc): its own SIGTERM
# notifier posts the death time there (RFC 3339), which starts the agreement on every process.
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def preemption_sync_available() -> bool:
    """Whether JAX's preemption sync manager runs here (``jax.distributed.initialize``
    starts it, unless ``jax_enable_preemption_service`` is off)."""
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


def post_preemption_notice() -> None:
    """Tell every process's preemption sync manager that this one got a stop notice.

    XLA's notifier only sees SIGTERM through its own C handler, which the guard's Python
    handler replaces while training (and it never sees SIGHUP), so the notice is posted
    here the way that notifier posts it (death time: now).  A notice already posted, by
    a peer that got the signal too, stands; any other failure is raised.
    """
    from jax._src import distributed

    when = datetime.datetime.now(datetime.timezone.utc).isoformat()
    try:
        distributed.global_state.client.key_value_set(_PREEMPTION_NOTICE_KEY, when)
    except Exception as err:  # noqa: BLE001 - only "already exists" is expected
        if "ALREADY_EXISTS" not in str(err):
            raise


class PreemptionGuard:
    """A flag set by SIGTERM/SIGINT/SIGHUP; the training loop polls ``requested``."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str = "request") -> None:
        self.signal_name = name


@contextlib.contextmanager
def preemption_guard(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                     ) -> Iterator[PreemptionGuard]:
    """Turn ``signals`` into ``guard.requested`` for the duration of the block.

    A second SIGINT while a stop is already pending raises ``KeyboardInterrupt``
    (the usual way out when the save itself hangs).  Outside the main thread
    no handler can be installed; the guard then only reacts to ``request()``.
    """
    guard = PreemptionGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return

    def handler(signum, _frame):
        if guard.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        guard.request(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
