"""Turn the failures a user can cause into one line on stderr and an exit status."""

from __future__ import annotations

import contextlib
import sys


class Outcome:
    code = 0


def _kind(exc: BaseException) -> tuple[int, str]:
    from bnfree_jax.train.loop import NonFiniteLoss, Preempted

    name = type(exc).__name__
    if isinstance(exc, Preempted):
        return 130, f"interrupted: {exc} (checkpoint saved; rerun the same command to resume)"
    if isinstance(exc, NonFiniteLoss):
        return 1, f"error: {exc} (the last good checkpoint is kept)"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if name == "ArtifactError" or isinstance(exc, (ValueError, FileNotFoundError, PermissionError)):
        return 2, f"error: {exc}"
    return 1, f"error: {name}: {exc}"


@contextlib.contextmanager
def one_line_errors():
    out = Outcome()
    try:
        yield out
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI's last line of defence
        code, msg = _kind(exc)
        print(str(msg).splitlines()[0] if msg else "error", file=sys.stderr)
        out.code = code
        raise SystemExit(code) from None
