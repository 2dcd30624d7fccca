"""Session fixtures: one finished tiny job, shared by every end-to-end test that reads or
copies a finished workdir (the kill tests compare their artifacts with its)."""

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# One persistent XLA compilation cache per test session, inherited by every `bnfree`
# subprocess: the many short jobs of the suite compile the same tiny networks, and a
# cached executable is the same program (artifacts are bit-identical with and without).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="bnfree_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from gcs_emulator import BUCKET
from job_helpers import ROOT, bnfree, run_args


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
    """The workdir of an uninterrupted `bnfree run` of the tiny job (do not modify it)."""
    wd = tmp_path_factory.mktemp("tiny_job") / "wd"
    p = bnfree(*run_args(wd))
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


@pytest.fixture
def tiny_job_copy(tiny_job, tmp_path):
    """A private copy of the finished tiny job, to damage or rerun."""
    dst = tmp_path / "wd"
    shutil.copytree(tiny_job, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """The emulator's environment (also set in this process for the session's rest)."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), BUCKET],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.time() < deadline and proc.poll() is None, "the GCS emulator did not start"
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
