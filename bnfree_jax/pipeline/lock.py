"""One job per workdir: an exclusive lock on WORKDIR/.lock for the job's life.

Two jobs writing one workdir corrupt each other silently (mixed checkpoints, duplicated
metrics lines), so a second one is refused at once.  The lock is ``fcntl.flock`` on the
lock file held open: the kernel drops it when its holder ends, however it ends (SIGKILL
included), so a lock left behind is never an obstacle and no PID has to be trusted.  The
file only records who holds it (PID, host, command, start time) so a refusal can name
them; flock alone decides, also when the holder is on another host sharing the
filesystem, where its PID cannot be checked.  The record is cleared on release, so one
that is left names a holder that was killed, and is taken over.

A workdir in a bucket (``gs://…``) cannot be flocked: its lock is the same flock on a file
of this host's cache standing for that URL (``storage.local_cache_dir``), and the holder's
record is also written to WORKDIR/.lock in the bucket, so a job started on another host
that finds a record it did not clear says who holds it (it cannot tell a live holder from
a killed one there, so it warns rather than refuses).

A multi-process job takes one lock, on process 0 (``primary``); the others take nothing.
Nested use in one thread on the same workdir is the same job: the inner one takes
nothing and the outer one keeps the lock until it exits.  Another thread is refused, as
another process is.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from typing import Callable, Iterator

from bnfree_jax.data.storage import Path, as_path, is_remote, local_cache_dir

LOCK_NAME = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # the filesystem cannot lock
_held: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of a lock file held here -> thread id
_fds: set[int] = set()  # their descriptors


def _drop_in_child() -> None:
    """A forked child (a data worker) closes its copies, so the job's lock dies with the job alone."""
    for fd in _fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _fds.clear()
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class WorkdirBusy(ValueError):
    """Another job holds the workdir (a ValueError: the CLI prints one line, status 2)."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _record(command: str) -> bytes:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "since": since}).encode()


def _read_record(fd: int) -> dict | None:
    """The holder's record, or None when it is empty or unreadable (being written, or garbage)."""
    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode())
        return rec if isinstance(rec, dict) and "pid" in rec else None
    except (OSError, ValueError):
        return None


def _holder(rec: dict | None) -> str:
    """'PID 1234 on host h1 (bnfree run, since ...)', or what is known of it."""
    if rec is None:
        return "another process (its lock record is empty or unreadable)"
    return (f"PID {rec.get('pid', '?')} on host {rec.get('host', '?')} "
            f"({rec.get('command', '?')}, since {rec.get('since', '?')})")


def _open_lock_file(workdir: Path) -> int:
    here = local_cache_dir("locks", workdir) if is_remote(workdir) else workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        here.mkdir(parents=True, exist_ok=True)
        return os.open(here / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ValueError(f"workdir {workdir} cannot be created or written: {e.strerror or e}") from None


def _take(fd: int, workdir: Path, command: str, log: Callable[[str], None]) -> bool:
    """Lock fd and write our record; False when the filesystem cannot lock (run unlocked)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WorkdirBusy(f"workdir {workdir} is in use by {_holder(_read_record(fd))}; "
                          "wait for it to finish or stop it") from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise ValueError(f"workdir {workdir} cannot be locked: {e.strerror or e}") from None
        log(f"warning: the filesystem of {workdir} cannot lock files; nothing stops a second job "
            f"from using this workdir at the same time")
        return False
    left = _read_record(fd)
    if left is not None:
        log(f"workdir {workdir}: taking over the lock left by {_holder(left)}, which is gone")
    record = _record(command)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
    except OSError as e:
        raise ValueError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    if is_remote(workdir):
        _post_remote_record(workdir, record, log)
    return True


def _post_remote_record(workdir: Path, record: bytes, log: Callable[[str], None]) -> None:
    """Name this holder in the bucket; warn about a record left by a job on another host."""
    path = workdir / LOCK_NAME
    try:
        left = json.loads(path.read_bytes()) if path.exists() else None
    except ValueError:
        left = None
    if isinstance(left, dict) and left.get("host") != socket.gethostname():
        log(f"warning: workdir {workdir} names {_holder(left)} as its holder; this host cannot "
            "check that job: if it is still running, stop this one")
    path.write_bytes(record)


@contextlib.contextmanager
def workdir_lock(workdir, command: str, primary: bool = True,
                 log: Callable[[str], None] = _stderr) -> Iterator[None]:
    """Hold the exclusive lock on ``workdir`` (created if missing) for the ``with`` body.

    Raises WorkdirBusy at once, naming the holder, when another job holds it.  Released on
    any exit of the body; a process killed outright loses it with its file descriptor.
    """
    if not primary:
        yield
        return
    workdir = as_path(workdir)
    fd = _open_lock_file(workdir)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if _held.get(key) == threading.get_ident():  # nested in this job: the outer one holds it
        os.close(fd)
        yield
        return
    try:
        locked = _take(fd, workdir, command, log)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = threading.get_ident()
    _fds.add(fd)
    try:
        yield
    finally:
        if fd in _fds:  # else a forked child unwinding: it has dropped its copy already
            _fds.discard(fd)
            del _held[key]
            if locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # a cleared record: released in order, nothing to take over
                if is_remote(workdir):
                    with contextlib.suppress(OSError):
                        (workdir / LOCK_NAME).unlink()
            os.close(fd)  # closing the only descriptor drops the flock
