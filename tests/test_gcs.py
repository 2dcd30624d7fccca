"""A job whose workdir is a bucket, against a local GCS (tests/gcs_emulator.py): killed inside
a PTL stage, rerun, the same artifact as on local disk, metrics appended in the bucket, the
artifact evaluated from the bucket, and no local folder named `gs:` anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gcs_emulator import BUCKET
from job_helpers import ROOT, artifact_sha, bnfree, run_args


def _remote(path: str):
    from etils import epath

    return epath.Path(f"gs://{BUCKET}/{path}")


def _steps(d) -> list[int]:
    """The step folders in a bucket folder, listed afresh (bnfree_jax.data.storage turns off
    fsspec's listing cache; imported here, so this process lists like the job)."""
    import bnfree_jax.data.storage  # noqa: F401

    try:
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())
    except (OSError, ValueError):
        return []


def _ledger(wd) -> dict:
    try:
        return json.loads((wd / "phases.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_a_bucket_workdir_survives_a_kill_and_gives_the_local_artifact(gcs, tiny_job, tmp_path):
    assert not (ROOT / "gs:").exists()
    wd = _remote("job")
    stage = wd / "checkpoints" / "ptl" / "stage1_conv1"
    proc = subprocess.Popen([sys.executable, "-m", "bnfree_jax.cli", *run_args(str(wd))], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **gcs},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not any(s >= 4 for s in _steps(stage)):
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before its first PTL stage checkpoint: {proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert "ptl/stage1_conv1" not in _ledger(wd) and "student" not in _ledger(wd)

    p = bnfree(*run_args(str(wd)), env_extra=gcs)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr or "resumed" in p.stderr, p.stderr[-3000:]
    got = hashlib.sha256((wd / "export" / "model.safetensors").read_bytes()).hexdigest()
    assert got == artifact_sha(tiny_job)
    local = json.loads((tiny_job / "export" / "manifest.json").read_text())["metrics"]
    assert json.loads((wd / "export" / "manifest.json").read_text())["metrics"] == local
    assert json.loads((wd / "report" / "summary.json").read_text())["int_sim_bit_exact"] is True
    # metrics appended in the bucket: the killed run's lines kept, the rerun's after them
    lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    local_lines = [json.loads(x) for x in (tiny_job / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines] == [r["phase"] for r in local_lines]
    assert [r["loss"] for r in lines] == [r["loss"] for r in local_lines]
    assert not (wd / ".lock").exists()  # the holder's record is cleared on release
    assert not (ROOT / "gs:").exists()  # the runs' working directory

    # the interpreter reads the artifact from the bucket and writes its result there
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.zeros(16, np.int32))
    runs = {}
    for name, art in (("bucket", str(wd / "export")), ("local", str(tiny_job / "export"))):
        out = _remote("eval.json") if name == "bucket" else tmp_path / "eval.json"
        e = bnfree("eval-int", "--artifact", art, "--images", str(tmp_path / "x.npy"),
                   "--labels", str(tmp_path / "y.npy"), "--out", str(out), env_extra=gcs)
        assert e.returncode == 0, e.stderr[-3000:]
        runs[name] = json.loads(out.read_text())
    for key in ("n", "top1", "max_abs_acc", "interpreter_float_ops"):
        assert runs["bucket"][key] == runs["local"][key], key
    assert runs["bucket"]["interpreter_float_ops"] == 0
