"""A stop signal to some processes of a job stops all of them at the same step, promptly,
with a checkpoint of that step; one process stops at the next step, on SIGHUP as on SIGTERM.

The two-process runs use real processes on this machine (jax.distributed with gloo
collectives, as launch/multiprocess_cpu.sh starts them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multidevice_step import TinyNet, init_model, make_loss_fn, synthetic_batch  # noqa: E402
from job_helpers import CONFIG, TINY  # noqa: E402
from test_multiprocess import ROOT, _env, _launch  # noqa: E402

from bnfree_jax.train import (Checkpointer, Preempted, create_train_state, make_mesh,  # noqa: E402
                              make_train_step, run_loop)
from bnfree_jax.train.loop import PEER_NOTICE  # noqa: E402
from bnfree_jax.train.phase import on_mesh  # noqa: E402

TX = optax.sgd(0.05)
FROZEN = {"temp": jnp.float32(1.0)}


class Batches:
    """Batch ``i`` depends on ``i`` only (``n`` examples: this process's share);
    ``on_index(i)`` runs before batch ``i`` is handed out."""

    def __init__(self, n: int = 4, on_index=None):
        self.index, self.n, self.on_index = 0, n, on_index

    def __iter__(self):
        return self

    def __next__(self):
        if self.on_index is not None:
            self.on_index(self.index)
        self.index += 1
        return synthetic_batch(self.n, 100 + self.index)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def _fresh(mesh):
    model = TinyNet()
    params, model_state = init_model(model)
    state = on_mesh(create_train_state(params, TX, model_state=model_state), mesh)  # several processes too
    return state, make_train_step(make_loss_fn(model), TX, mesh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two(cmd: list[str], devices: int, log_dir: Path, name: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start process 0 and 1 of a 2-process job (BNFREE_* env, as the launcher sets it),
    each writing its output to its own log."""
    port, procs, logs = _free_port(), [], []
    for i in (0, 1):
        env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   BNFREE_COORDINATOR=f"127.0.0.1:{port}", BNFREE_NUM_PROCESSES="2", BNFREE_PROCESS_ID=str(i))
        logs.append(log_dir / f"{name}{i}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs, logs


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --- one process ---------------------------------------------------------------------

def test_sighup_stops_saves_and_raises_like_sigterm(tmp_path, monkeypatch):
    """One process: the step running when SIGHUP lands is saved, then ``Preempted``;
    no host sync is made on the way (one process must never pay for agreement)."""
    from jax.experimental import multihost_utils

    def refuse(what):
        def call(*_a, **_k):
            raise AssertionError(f"{what} in a one-process run")
        return call
    monkeypatch.setattr(multihost_utils, "process_allgather", refuse("a host sync"))
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        refuse("the preemption sync manager consulted"))
    mesh = make_mesh(jax.devices()[:1])
    state, step = _fresh(mesh)
    before = signal.getsignal(signal.SIGHUP)
    ck = Checkpointer(tmp_path / "ck", save_every=1000)
    it = Batches(on_index=lambda i: i == 4 and os.kill(os.getpid(), signal.SIGHUP))
    with pytest.raises(Preempted) as err:
        run_loop(step_fn=step, state=state, frozen=FROZEN, batches=it, data_iterator=it, mesh=mesh,
                 num_steps=100, checkpointer=ck, phase="teacher", log_every=2, progress=False)
    assert err.value.step == 5 and err.value.signal_name == "SIGHUP", err.value
    assert signal.getsignal(signal.SIGHUP) is before
    assert ck.all_steps() == [5]  # saved, and waited for, before Preempted was raised
    ck.close()


# --- two processes, run_loop directly ------------------------------------------------

LOOP = r"""
import json, os, signal, sys
import jax
from bnfree_jax.train.distributed import initialize
jax.config.update("jax_enable_preemption_service", sys.argv[3] == "sync")
initialize()
from jax.experimental import multihost_utils
sys.path.insert(0, sys.argv[2])
from test_preemption import Batches, FROZEN, _fresh
from bnfree_jax.train import Checkpointer, Preempted, make_mesh, run_loop

syncs = {"n": 0}
allgather = multihost_utils.process_allgather
def counted(*a, **k):
    syncs["n"] += 1
    return allgather(*a, **k)
multihost_utils.process_allgather = counted

mesh = make_mesh()
state, step = _fresh(mesh)
out = {"devices": jax.device_count()}
run_loop(step_fn=step, state=state, frozen=FROZEN, batches=Batches(2), mesh=mesh, num_steps=100,
         log_every=10, progress=False, phase="quiet")
out["syncs_per_100_steps"] = syncs["n"]
# A second phase (its own steps restart at 1): SIGHUP to both processes at its step 6.
state, step = _fresh(mesh)
ck = Checkpointer(os.path.join(sys.argv[1], "ck"), save_every=1000)
it = Batches(2, on_index=lambda i: i == 5 and os.kill(os.getpid(), signal.SIGHUP))
try:
    run_loop(step_fn=step, state=state, frozen=FROZEN, batches=it, data_iterator=it, mesh=mesh,
             num_steps=200, checkpointer=ck, log_every=50, progress=False, phase="stopped")
except Preempted as e:
    out.update(stopped_at=e.step, signal=e.signal_name, saved=ck.all_steps())
ck.close()
print("RESULT " + json.dumps(out), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("service", ["sync", "off"])
def test_two_processes_agree_without_a_host_sync_per_step(tmp_path, service):
    """With JAX's preemption sync manager, 100 steps with log points every 10 cost one host
    sync (the phase's last step), not 10, and a notice stops both processes at the same
    step, well before the next log point, even in a later phase whose step numbers restart.
    With the service off, they still agree, at log points (the old way)."""
    cmd = [sys.executable, "-c", LOOP, str(tmp_path), str(Path(__file__).parent), service]
    procs, logs = _two(cmd, devices=1, log_dir=tmp_path, name="loop")
    rcs = _finish(procs, timeout=180)
    outs = [log.read_text() for log in logs]
    assert rcs == [0, 0], "\n".join(o[-3000:] for o in outs)
    res = [json.loads(re.search(r"^RESULT (.*)$", o, re.M).group(1)) for o in outs]
    assert res[0]["devices"] == 2
    for r in res:
        assert r["signal"] == "SIGHUP", r
        if service == "sync":
            assert r["syncs_per_100_steps"] == 1, r  # old code: one per log point, 10
            assert 6 <= r["stopped_at"] < 20, r  # old code: the next log point, 50
        else:
            assert r["syncs_per_100_steps"] == 10 and r["stopped_at"] == 50, r
    assert res[0]["stopped_at"] == res[1]["stopped_at"] and res[0]["saved"] == [res[0]["stopped_at"]], res


# --- two processes, the command line -------------------------------------------------

# tiny_cnn: many teacher steps, so the job is still training when the signal lands
JOB = ["--config", CONFIG, *TINY, "teacher.steps=140", "checkpoint.save_every=1000"]


def _logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["step"] for x in lines if x.strip().endswith("}") and '"teacher"' in x]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_the_rerun_resumes(tmp_path):
    workdir = tmp_path / "job"
    args = ["train-teacher", "--workdir", str(workdir), *JOB]
    procs, logs = _two([sys.executable, "-m", "bnfree_jax.cli", "--distributed", *args], devices=2,
                       log_dir=tmp_path, name="first")
    try:
        deadline = time.monotonic() + 240
        while 50 not in _logged_steps(workdir) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.05)
        assert 50 in _logged_steps(workdir), logs[0].read_text()[-3000:]
        procs[1].send_signal(signal.SIGTERM)  # process 1 only
    finally:
        rcs = _finish(procs, timeout=120)
    outs = [log.read_text() for log in logs]
    lasts = [o.strip().splitlines()[-1] for o in outs]
    assert rcs == [130, 130], "\n".join(o[-2000:] for o in outs)
    stops = []
    for last, by in zip(lasts, (PEER_NOTICE, "SIGTERM")):
        m = re.fullmatch(rf"interrupted: stopped by {re.escape(by)} at step (\d+) of phase 'teacher' "
                         r"after saving a checkpoint \(checkpoint saved; rerun the same command to resume\)", last)
        assert m, last
        stops.append(int(m.group(1)))
    step = stops[0]
    assert stops[1] == step and 50 <= step < 80, stops  # old code: the next log point, 100
    saved = sorted(int(p.name) for p in (workdir / "checkpoints" / "teacher").iterdir() if p.name.isdigit())
    assert saved == [step], saved

    rerun = _launch(args, timeout=300)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    for p in ("0", "1"):
        assert re.search(rf"\[p{p}\].*resuming at step {step}\b", out), out[-3000:]
        assert re.search(rf"\[p{p}\] teacher_top1=", out), out[-3000:]
    assert 140 in _logged_steps(workdir)
