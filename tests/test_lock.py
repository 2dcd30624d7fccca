"""The workdir lock against real processes: a second job is refused naming the holder, a
killed holder's lock is taken at once, and the lock is released however the job ends."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bnfree_jax.pipeline import lock
from bnfree_jax.pipeline.lock import LOCK_NAME, WorkdirBusy, workdir_lock

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# takes the lock as a job does, says so through a file, then works (sleeps)
LOCKED_JOB = """
import pathlib, sys, time
from bnfree_jax.pipeline.lock import workdir_lock
with workdir_lock(sys.argv[1], "bnfree run"):
    pathlib.Path(sys.argv[2]).write_text("ready")
    time.sleep(60)
"""
# as LOCKED_JOB, but first forks a worker (as a data loader may) that outlives the job
FORKING_JOB = """
import os, pathlib, sys, time
from bnfree_jax.pipeline.lock import workdir_lock
with workdir_lock(sys.argv[1], "bnfree run"):
    worker = pathlib.Path(sys.argv[2] + ".worker")
    if os.fork() == 0:  # in the child, fork has returned after the at-fork hooks ran
        worker.with_suffix(".tmp").write_text(str(os.getpid()))
        os.replace(worker.with_suffix(".tmp"), worker)  # seen whole or not at all
        time.sleep(60)
        os._exit(0)
    while not worker.exists():
        time.sleep(0.01)
    pathlib.Path(sys.argv[2]).write_text("ready")
    time.sleep(60)
"""
# writes RECORD into WORKDIR/.lock, flocked or not, bypassing workdir_lock
RAW_HOLDER = """
import fcntl, os, pathlib, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
if sys.argv[4] == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, sys.argv[3].replace("SELF", str(os.getpid())).encode())
pathlib.Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""


@pytest.fixture
def spawn(tmp_path):
    """Start a holder script; wait until it says it is ready; kill it at the end."""
    procs = []

    def start(script, *args):
        ready = tmp_path / f"ready{len(procs)}"
        p = subprocess.Popen([sys.executable, "-c", script, *map(str, args[:1]), str(ready), *args[1:]],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert p.poll() is None, f"holder died: {p.stderr.read()}"
            assert time.monotonic() < deadline, "holder never got ready"
            time.sleep(0.02)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()
        p.stderr.close()


def refusal(workdir) -> str:
    """Try to take the lock; return the refusal's message (fails if it was taken)."""
    entered = []
    with pytest.raises(WorkdirBusy) as e:
        with workdir_lock(workdir, "bnfree run"):
            entered.append(True)
    assert not entered
    return str(e.value)


def test_second_job_is_refused_naming_the_holder(tmp_path, spawn):
    wd = tmp_path / "job"
    holder = spawn(LOCKED_JOB, wd)
    msg = refusal(wd)
    assert msg.startswith(f"workdir {wd} is in use by PID {holder.pid} on host {HOST} (bnfree run, since ")
    assert msg.endswith("; wait for it to finish or stop it") and "\n" not in msg
    from bnfree_jax.pipeline.errors import _kind

    assert _kind(WorkdirBusy(msg)) == (2, f"error: {msg}")  # the CLI: one line, status 2


def test_lock_of_a_killed_holder_is_taken_at_once(tmp_path, spawn):
    wd = tmp_path / "job"
    holder = spawn(LOCKED_JOB, wd)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == holder.pid  # the record outlives it
    lines = []
    t0 = time.monotonic()
    with workdir_lock(wd, "bnfree distill", log=lines.append):
        assert time.monotonic() - t0 < 5.0  # no waiting for anything (loose: a loaded disk)
        rec = json.loads((wd / LOCK_NAME).read_text())
        assert (rec["pid"], rec["host"], rec["command"]) == (os.getpid(), HOST, "bnfree distill")
    assert len(lines) == 1 and f"PID {holder.pid} on host {HOST}" in lines[0] and "taking over" in lines[0]


def test_a_forked_worker_does_not_keep_a_killed_jobs_lock(tmp_path, spawn):
    wd = tmp_path / "job"
    holder = spawn(FORKING_JOB, wd)
    worker = int((tmp_path / "ready0.worker").read_text())
    try:
        assert f"PID {holder.pid} on host" in refusal(wd)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(worker, 0)  # the worker lives on...
        with workdir_lock(wd, "bnfree run", log=lambda m: None):  # ...yet the lock is free
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_lock_is_released_when_the_job_raises(tmp_path, exc):
    wd = tmp_path / "job"
    with pytest.raises(type(exc)):
        with workdir_lock(wd, "bnfree run"):
            raise exc
    assert (wd / LOCK_NAME).read_text() == ""  # record cleared: nothing to take over
    lines = []
    with workdir_lock(wd, "bnfree run", log=lines.append):  # a fresh descriptor: flock would refuse it
        assert json.loads((wd / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lines == []


def test_a_second_thread_is_refused_and_nesting_in_one_thread_keeps_the_lock(tmp_path):
    wd = tmp_path / "job"
    seen = []

    def other_thread():
        try:
            with workdir_lock(wd, "bnfree export"):
                seen.append("taken")
        except WorkdirBusy as e:
            seen.append(str(e))

    def try_from_other_thread():
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        return seen.pop()

    with workdir_lock(wd, "bnfree run"):
        with workdir_lock(wd / ".." / "job", "bnfree export"):  # nested, same job: allowed
            assert json.loads((wd / LOCK_NAME).read_text())["command"] == "bnfree run"
        assert f"in use by PID {os.getpid()} on host {HOST} (bnfree run" in try_from_other_thread()
    assert try_from_other_thread() == "taken"


def test_non_primary_process_takes_nothing(tmp_path, spawn):
    wd = tmp_path / "job"
    with workdir_lock(wd, "bnfree run", primary=False):
        assert not wd.exists()
    spawn(LOCKED_JOB, wd)
    with workdir_lock(wd, "bnfree run", primary=False):  # process 0 holds it; this one is not refused
        pass
    assert "in use by" in refusal(wd)


def test_unreadable_record_still_refuses(tmp_path, spawn):
    wd = tmp_path / "job"
    spawn(RAW_HOLDER, wd, "{garbage", "flock")
    msg = refusal(wd)
    assert msg == (f"workdir {wd} is in use by another process (its lock record is empty or unreadable); "
                   "wait for it to finish or stop it")


def test_holder_on_another_host_is_named_and_flock_decides(tmp_path, spawn):
    wd = tmp_path / "job"
    other = json.dumps({"pid": 1, "host": "h-elsewhere", "command": "bnfree run", "since": "2026-12-01T09:00:00"})
    holder = spawn(RAW_HOLDER, wd, other, "flock")
    assert refusal(wd) == (f"workdir {wd} is in use by PID 1 on host h-elsewhere (bnfree run, since "
                           "2026-12-01T09:00:00); wait for it to finish or stop it")
    holder.kill()
    holder.wait()
    with workdir_lock(wd, "bnfree run", log=lambda m: None):  # its PID cannot be checked; the free flock can
        assert json.loads((wd / LOCK_NAME).read_text())["host"] == HOST


def test_a_record_without_a_flock_does_not_refuse(tmp_path, spawn):
    """The refusal comes from the flock, not the record: a live PID's record alone is taken over."""
    wd = tmp_path / "job"
    rec = json.dumps({"pid": "SELF", "host": HOST, "command": "bnfree run", "since": "x"}).replace('"SELF"', "SELF")
    holder = spawn(RAW_HOLDER, wd, rec, "none")
    lines = []
    with workdir_lock(wd, "bnfree run", log=lines.append):
        pass
    assert len(lines) == 1 and f"PID {holder.pid}" in lines[0]


def test_missing_workdir_is_created_and_an_impossible_one_is_one_line(tmp_path):
    wd = tmp_path / "a" / "b" / "job"
    with workdir_lock(wd, "bnfree run"):
        assert (wd / LOCK_NAME).is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^workdir .*/file/job cannot be created or written: Not a directory$") as e:
        with workdir_lock(tmp_path / "file" / "job", "bnfree run"):
            pass
    assert not isinstance(e.value, WorkdirBusy)


def failing_flock(code):
    def flock(fd, op):
        raise OSError(code, os.strerror(code))
    return flock


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(lock.fcntl, "flock", failing_flock(errno.ENOLCK))
    lines, ran = [], []
    with workdir_lock(tmp_path / "job", "bnfree run", log=lines.append):
        ran.append(True)
    assert ran and len(lines) == 1 and lines[0].startswith("warning: the filesystem of ")
    monkeypatch.setattr(lock.fcntl, "flock", failing_flock(errno.EIO))  # any other failure: refuse
    with pytest.raises(ValueError, match=r"^workdir .*job cannot be locked: Input/output error$"):
        with workdir_lock(tmp_path / "job", "bnfree run", log=lines.append):
            pass
