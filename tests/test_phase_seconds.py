"""A phase stopped and resumed records the seconds of all its runs, not only the last one's
(bench/deep_plain_table.py's `wall_s` is read from these records)."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bnfree_jax.pipeline import teacher
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.train.loop import Preempted


class Clock:
    """time.time() that moves only when told."""

    def __init__(self):
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(time, "time", c)
    return c


def test_a_stopped_run_leaves_its_seconds_and_the_finishing_run_adds_them(tmp_path, clock):
    ledger = Ledger(tmp_path)
    with pytest.raises(Preempted):
        with ledger.clock("ptl/stage1") as elapsed:
            clock.now += 100.0
            raise Preempted("stage1", 7, "SIGTERM")
    saved = json.loads((tmp_path / "phases.json").read_text())
    assert saved[Ledger.UNFINISHED] == {"ptl/stage1": 100.0}
    assert not Ledger(tmp_path).done("ptl/stage1")

    ledger = Ledger(tmp_path)  # the rerun reads what the stopped run left
    with pytest.raises(Preempted):
        with ledger.clock("ptl/stage1"):
            clock.now += 20.5
            raise Preempted("stage1", 9, "SIGTERM")
    ledger = Ledger(tmp_path)
    with ledger.clock("ptl/stage1") as elapsed:
        clock.now += 4.25
        assert elapsed() == 124.75
        ledger.mark_done("ptl/stage1", seconds=elapsed())
    saved = json.loads((tmp_path / "phases.json").read_text())
    assert saved["ptl/stage1"]["seconds"] == 124.75
    assert Ledger.UNFINISHED not in saved  # nothing left over once its only phase finished


def test_a_phase_that_finishes_keeps_other_phases_unfinished_seconds(tmp_path, clock):
    ledger = Ledger(tmp_path)
    for phase, spent in (("teacher", 30.0), ("qat", 8.0)):
        with pytest.raises(KeyboardInterrupt):
            with ledger.clock(phase):
                clock.now += spent
                raise KeyboardInterrupt
    with ledger.clock("qat") as elapsed:
        clock.now += 2.0
        ledger.mark_done("qat", seconds=elapsed())
    saved = json.loads((tmp_path / "phases.json").read_text())
    assert saved["qat"]["seconds"] == 10.0
    assert saved[Ledger.UNFINISHED] == {"teacher": 30.0}


def test_a_stop_after_the_phase_is_marked_done_adds_nothing(tmp_path, clock):
    """mark_done raises a stop that arrived during the phase; the phase is done by then."""
    ledger = Ledger(tmp_path)
    with pytest.raises(Preempted):
        with ledger.clock("teacher") as elapsed:
            clock.now += 3.0
            ledger.mark_done("teacher", seconds=elapsed())
            clock.now += 1.0
            raise Preempted("teacher", 10, "SIGTERM")
    saved = json.loads((tmp_path / "phases.json").read_text())
    assert saved["teacher"]["seconds"] == 3.0 and Ledger.UNFINISHED not in saved


def test_a_teacher_phase_resumed_after_a_stop_records_both_runs(tmp_path, clock, monkeypatch):
    """The float teacher stopped after 100 s and finished by a rerun 5 s later: 105 s."""
    runs = []

    def fake_train(phase, net, variables, steps, batch, optim, **kw):
        runs.append(phase)
        if len(runs) == 1:
            clock.now += 100.0
            raise Preempted(phase, 40, "SIGTERM")
        clock.now += 5.0
        return variables, 0.5

    monkeypatch.setattr(teacher, "train_bn_network", fake_train)
    ctx = SimpleNamespace(workdir=tmp_path, rt=None, feed=None, config=SimpleNamespace(seed=0), eval_split="test",
                          log=lambda m: None)
    cfg = SimpleNamespace(steps=80, batch=8, optim=None)
    variables = {"params": {"w": np.ones((2, 2), np.float32)}}
    with pytest.raises(Preempted):
        teacher._phase(ctx, Ledger(tmp_path), "teacher", None, variables, cfg, "float BN teacher")
    teacher._phase(ctx, Ledger(tmp_path), "teacher", None, variables, cfg, "float BN teacher")
    assert runs == ["teacher", "teacher"]
    record = json.loads((tmp_path / "phases.json").read_text())["teacher"]
    assert record["done"] and record["seconds"] == 105.0
