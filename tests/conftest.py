"""Session fixtures: one finished tiny job, shared by every end-to-end test that reads or
copies a finished workdir (the kill tests compare their artifacts with its)."""

import os
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache per test session, inherited by every `bnfree`
# subprocess: the many short jobs of the suite compile the same tiny networks, and a
# cached executable is the same program (artifacts are bit-identical with and without).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="bnfree_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from job_helpers import bnfree, run_args


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
