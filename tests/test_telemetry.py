"""The pod user's figures: XLA's FLOPs of a compiled step, the chips' peaks, rates and MFU
between logged steps, and TensorBoard event files that hold them."""

from __future__ import annotations

import json
import math
import struct

import jax
import jax.numpy as jnp
import pytest

from bnfree_jax.train import telemetry


def test_compiled_flops_are_xlas_count_of_the_program():
    m, k, n = 64, 128, 32
    f = jax.jit(lambda a, b: a @ b)
    got = telemetry.compiled_flops(f, jax.ShapeDtypeStruct((m, k), jnp.float32),
                                   jax.ShapeDtypeStruct((k, n), jnp.float32))
    assert got == pytest.approx(2 * m * k * n, rel=0.01)


@pytest.mark.parametrize("kind,peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                       ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
                                       ("cpu", None)])
def test_chip_peaks(kind, peak):
    assert telemetry.chip_peak_flops(kind) == peak


def test_rates_and_mfu_between_logged_steps():
    t = telemetry.Throughput(global_batch=256, devices=4, step_flops=2e12, peak_flops=1e14)
    assert t.update(10, 100.0) == {}
    r = t.update(20, 102.0)  # 10 steps in 2 s
    assert r["step_seconds"] == pytest.approx(0.2)
    assert r["images_per_s"] == pytest.approx(1280) and r["images_per_s_per_chip"] == pytest.approx(320)
    assert r["mfu"] == pytest.approx(2e12 / 0.2 / 1e14)
    assert t.update(20, 103.0) == {}  # no progress: no rate
    assert "mfu" not in telemetry.Throughput(global_batch=8, devices=1, _last=(0, 0.0)).update(1, 1.0)


def _scalars(path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of a TFRecord event file, read with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        out += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value]
    return out


def test_event_files_hold_each_phases_scalars(tmp_path):
    log = telemetry.EventLog(tmp_path / "tb")
    log.scalars("teacher", 5, {"loss": 1.5, "images_per_s": 100.0})
    log.scalars("ptl/stage1", 7, {"loss": 0.25})
    log.close()
    (teacher,) = (tmp_path / "tb" / "teacher").glob("events.out.tfevents.*")
    (stage,) = (tmp_path / "tb" / "ptl" / "stage1").glob("events.out.tfevents.*")
    assert sorted(_scalars(teacher)) == [("images_per_s", 5, 100.0), ("loss", 5, 1.5)]
    assert _scalars(stage) == [("loss", 7, 0.25)]
    off = telemetry.EventLog(tmp_path / "off", enabled=False)
    off.scalars("teacher", 1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()


def test_a_job_writes_each_phases_losses_to_tensorboard(tiny_job):
    lines = [json.loads(x) for x in (tiny_job / "metrics.jsonl").read_text().splitlines()]
    assert len({r["phase"] for r in lines}) == 6
    for phase in {r["phase"] for r in lines}:
        (events,) = (tiny_job / "tensorboard" / phase).glob("events.out.tfevents.*")
        loss = {step: value for tag, step, value in _scalars(events) if tag == "loss"}
        lr = {step: value for tag, step, value in _scalars(events) if tag == "lr"}
        for r in lines:
            if r["phase"] == phase:  # every logged loss and learning rate, as float32
                assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6), (phase, r["step"])
                assert lr[r["step"]] == pytest.approx(r["lr"], rel=1e-6), (phase, r["step"])


def _warmup_cosine(peak: float, warmup: int, total: int, update: int) -> float:
    """optax's linear warmup then cosine decay to 0, written out."""
    if update < warmup:
        return peak * update / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(update - warmup, total - warmup) / (total - warmup)))


def test_logged_learning_rate_is_the_schedule_of_each_step(tiny_job):
    config = json.loads((tiny_job / "config.json").read_text())
    lines = [json.loads(x) for x in (tiny_job / "metrics.jsonl").read_text().splitlines()]
    for phase in ("teacher", "qat"):
        opt, total = config[phase]["optim"], config[phase]["steps"]
        warmup = round(opt["warmup_steps"] * total)
        rows = [r for r in lines if r["phase"] == phase]
        assert rows
        for r in rows:  # the update of step k is the schedule's count k - 1
            assert r["lr"] == pytest.approx(_warmup_cosine(opt["lr"], warmup, total, r["step"] - 1), rel=1e-5)
    assert all("lr" in r for r in lines)


def test_profile_steps_write_a_trace(tmp_path):
    from job_helpers import TINY, bnfree

    wd = tmp_path / "wd"
    p = bnfree("train-teacher", "--config", "configs/mnist_alexnet.py:quick", "--workdir", str(wd),
               "--profile_steps", "2:3", *TINY, "teacher.steps=4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert list((wd / "profile" / "teacher").rglob("*.xplane.pb")), sorted(wd.rglob("*"))
    bad = bnfree("train-teacher", "--workdir", str(tmp_path / "x"), "--profile_steps", "3:2")
    assert bad.returncode == 2 and "A <= B" in bad.stderr.strip().splitlines()[-1]
