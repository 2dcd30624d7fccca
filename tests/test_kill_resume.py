"""A job killed at any instant and rerun gives the uninterrupted run's artifact, bit for bit.

One workdir is killed again and again, each time at an instant chosen from its own
progress (its checkpoints and ledger), and rerun: inside the teacher, inside the local
initialisation's fit before its first checkpoint, inside a stage after its first
checkpoint, inside the head stage's hand-over before its first checkpoint and after one
(its checkpoints then made unreadable), inside the fine-tune (its step folders then
deleted), in the export (by SIGTERM: one line, status 143) and in the report. The last
rerun's artifact must equal the uninterrupted `tiny_job`'s. Along the way a second run on
the busy workdir is refused naming the holder.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from job_helpers import artifact_sha, bnfree, last_line, run_args, start


def steps(d: Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def ledger(wd: Path) -> dict:
    try:
        return json.loads((wd / "phases.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def ck(wd: Path, phase: str) -> Path:
    return wd / "checkpoints" / phase


# (name, the phase that must still be unfinished when the kill lands, when to kill)
INSTANTS = [
    ("teacher", "teacher", lambda wd: any(s >= 4 for s in steps(ck(wd, "teacher")))),
    ("local-init fit", "ptl/local_init",
     lambda wd: ck(wd, "ptl/local_init").exists() and not steps(ck(wd, "ptl/local_init"))),
    ("stage after its first checkpoint", "ptl/stage1_conv1",
     lambda wd: any(s >= 4 for s in steps(ck(wd, "ptl/stage1_conv1")))),
    ("head-stage hand-over", "ptl/stage2_conv2-fc3",
     lambda wd: ck(wd, "ptl/stage2_conv2-fc3").exists() and not steps(ck(wd, "ptl/stage2_conv2-fc3"))),
    ("head stage after a checkpoint", "ptl/stage2_conv2-fc3",
     lambda wd: any(s >= 8 for s in steps(ck(wd, "ptl/stage2_conv2-fc3")))),
    ("fine-tune", "ptl/finetune", lambda wd: any(s >= 4 for s in steps(ck(wd, "ptl/finetune")))),
    ("export", "export", lambda wd: "student" in ledger(wd) and "export" not in ledger(wd)),
    ("report", "report",  # its layer statistics written: the report phase has begun
     lambda wd: "report" not in ledger(wd) and (wd / "report" / "layer_stats.json").exists()),
]


def wait_for(proc, cond, wd: Path, timeout: float = 600) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond(wd):
            return True
        time.sleep(0.01)
    return False


def damage(name: str, wd: Path, log: list) -> None:
    """What the user does to the workdir after some kills, before the rerun."""
    if name == "head stage after a checkpoint":  # every checkpoint of the stage unreadable
        d = ck(wd, "ptl/stage2_conv2-fc3")
        for f in d.rglob("*"):
            if f.is_file() and f.stat().st_size > 0 and "state" in f.relative_to(d).parts:
                f.write_bytes(b"garbage")
        log.append("corrupted")
    if name == "fine-tune":  # the stage's step folders deleted
        for s in steps(ck(wd, "ptl/finetune")):
            shutil.rmtree(ck(wd, "ptl/finetune") / str(s))
        log.append("deleted")


@pytest.mark.slow
def test_kill_at_many_instants_then_rerun_gives_the_same_artifact(tiny_job, tmp_path):
    wd = tmp_path / "wd"
    hit, notes = [], []
    for name, phase, cond in INSTANTS:
        proc = start(*run_args(wd))
        assert wait_for(proc, cond, wd), f"{name}: the run never reached it ({proc.poll()=})"
        proc.send_signal(signal.SIGSTOP)  # frozen at the instant, still holding the workdir
        assert phase not in ledger(wd), f"{name}: the run was stopped after {phase} finished"
        if name == "stage after its first checkpoint":  # a second run on the busy workdir
            other = bnfree(*run_args(wd))
            assert other.returncode == 2, other.stderr[-2000:]
            assert f"is in use by PID {proc.pid}" in last_line(other), last_line(other)
        if name == "export":  # a polite stop outside training: one line, 128 + SIGTERM
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 143, err[-2000:]
            assert "stopped by SIGTERM" in err.strip().splitlines()[-1], err[-2000:]
        else:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        if notes[-1:] == ["corrupted"] and len(notes) == 1:  # the run after the damage said what it did
            assert "no readable checkpoint" in err and "starting this phase from its beginning" in err, err[-3000:]
        hit.append(name)
        damage(name, wd, notes)
    p = bnfree(*run_args(wd))
    assert p.returncode == 0, p.stderr[-3000:]
    assert hit == [n for n, _, _ in INSTANTS] and notes == ["corrupted", "deleted"]
    assert artifact_sha(wd) == artifact_sha(tiny_job)
    ref = json.loads((tiny_job / "export" / "manifest.json").read_text())["metrics"]
    got = json.loads((wd / "export" / "manifest.json").read_text())["metrics"]
    assert got == ref
    assert json.loads((wd / "report" / "summary.json").read_text())["int_sim_bit_exact"] is True
