"""Turn the failures a user can cause into one line on stderr and an exit status."""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
import sys


class Outcome:
    code = 0


class Terminated(BaseException):
    """A stop signal (SIGTERM, SIGHUP) outside the training loop, which has its own."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _no_space(exc: OSError) -> str:
    where = getattr(exc, "filename", None) or "the workdir"
    try:
        free = f"{shutil.disk_usage(where if isinstance(where, str) else '.').free / 2 ** 20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return f"error: no space left on device writing {where} ({free}); free some space and rerun to resume"


def _find_cause(exc: BaseException, kind):
    """`exc` or the first exception of type `kind` in its cause/context chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _kind(exc: BaseException) -> tuple[int, str]:
    from bnfree_jax.train.loop import NonFiniteLoss, Preempted

    name = type(exc).__name__
    if isinstance(exc, Terminated):
        return 128 + exc.signum, f"stopped by {exc} (rerun the same command to resume)"
    if isinstance(exc, Preempted):
        return 130, f"interrupted: {exc} (checkpoint saved; rerun the same command to resume)"
    if isinstance(exc, NonFiniteLoss):
        return 1, f"error: {exc} (the last good checkpoint is kept)"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    full = _find_cause(exc, OSError)
    if full is not None and full.errno == errno.ENOSPC:
        return 1, _no_space(full)
    if name == "ArtifactError" or isinstance(exc, (ValueError, FileNotFoundError, PermissionError)):
        return 2, f"error: {exc}"
    return 1, f"error: {name}: {exc}"


# Stop signals received and not yet acted on. Signals are process-wide, so is this record.
_PENDING: list[int] = []


def raise_if_stopped() -> None:
    """Raise `Terminated` for a stop signal whose exception was swallowed where it landed
    (a `__del__` or another callback run from C ignores exceptions); called at every phase
    boundary (the ledger's writes) and when the command returns."""
    if _PENDING:
        raise Terminated(_PENDING.pop(0))


@contextlib.contextmanager
def stop_signals_raise():
    """SIGTERM and SIGHUP raise `Terminated` (the training loop turns them into a saved
    checkpoint first), so a stop during export or the report still ends in one line."""
    def handler(signum, _frame):
        _PENDING.append(signum)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
        raise_if_stopped()
    except Terminated:
        _PENDING.clear()
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def one_line_errors():
    out = Outcome()
    try:
        with stop_signals_raise():
            yield out
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI's last line of defence
        code, msg = _kind(exc)
        print(str(msg).splitlines()[0] if msg else "error", file=sys.stderr)
        out.code = code
        raise SystemExit(code) from None
