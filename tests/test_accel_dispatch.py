"""Asynchronous dispatch: the loop fetches metrics from the devices once per `log_every` steps
(plus the checkpoints'), never per step; the metrics lines are those of each logged step; a
NaN is reported at the next fetch with the step it appeared at; `log_every` comes from the
runtime (the config's checkpoint.log_every)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multidevice_step import Batches as SharedBatches  # noqa: E402
from _multidevice_step import TinyNet, init_model, make_loss_fn  # noqa: E402

from bnfree_jax.config_io import ConfigError, load_config, to_dict  # noqa: E402
from bnfree_jax.pipeline.validate import validate_config  # noqa: E402
from bnfree_jax.train import loop  # noqa: E402
from bnfree_jax.train.checkpoint import Checkpointer  # noqa: E402
from bnfree_jax.train.mesh import make_mesh, put_replicated  # noqa: E402
from bnfree_jax.train.phase import train_phase  # noqa: E402
from bnfree_jax.train.runtime import Runtime  # noqa: E402
from bnfree_jax.train.state import create_train_state  # noqa: E402
from bnfree_jax.train.step import make_train_step  # noqa: E402

TX = optax.adam(0.01)
FROZEN = {"temp": jnp.float32(1.0)}


class Batches(SharedBatches):
    """The shared checkpointable batches, from another seed base."""

    def __init__(self, poison_at=None):
        super().__init__(poison_at=poison_at, seed_base=200)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


@pytest.fixture(scope="module")
def step_fn(mesh):
    return make_train_step(make_loss_fn(TinyNet()), TX, mesh)


def fresh_state(mesh):
    params, model_state = init_model(TinyNet())
    return put_replicated(create_train_state(params, TX, model_state=model_state, rng=1), mesh)


@pytest.fixture
def fetches(monkeypatch):
    """Every device→host transfer of the loop, counted (the start's read of the step too)."""
    calls = []
    real = jax.device_get

    def counting(tree):
        calls.append(tree)
        return real(tree)

    monkeypatch.setattr(jax, "device_get", counting)
    return calls


def _lines(path):
    return [json.loads(x) for x in open(path)]


def test_fetches_once_per_log_every_steps_plus_checkpoints(tmp_path, mesh, step_fn, fetches):
    n, every = 20, 5
    ck = Checkpointer(tmp_path / "ck", save_every=8, keep=5)
    it = Batches()
    loop.run_loop(step_fn=step_fn, state=fresh_state(mesh), frozen=FROZEN, batches=it, data_iterator=it,
                  mesh=mesh, num_steps=n, checkpointer=ck, metrics_path=tmp_path / "m.jsonl",
                  log_every=every, progress=True, phase="p")
    ck.close()
    saves = ck.all_steps()
    assert saves == [8, 16, 20]
    fetched_steps = {5, 10, 15, 20} | set(saves)  # one fetch where a log step is a checkpoint
    assert len(fetches) == 1 + len(fetched_steps) <= 1 + n // every + len(saves)  # 1: the start's step
    assert [r["step"] for r in _lines(tmp_path / "m.jsonl")] == [5, 10, 15, 20]


def test_metrics_lines_are_each_logged_steps_own_metrics(tmp_path, mesh, step_fn):
    """A line every 5 steps carries exactly what a line every step says at that step."""
    for every in (1, 5):
        loop.run_loop(step_fn=step_fn, state=fresh_state(mesh), frozen=FROZEN, batches=Batches(), mesh=mesh,
                      num_steps=12, metrics_path=tmp_path / f"every{every}.jsonl", log_every=every,
                      progress=False, phase="p")
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    each = {r["step"]: strip(r) for r in _lines(tmp_path / "every1.jsonl")}
    sparse = [strip(r) for r in _lines(tmp_path / "every5.jsonl")]
    assert [r["step"] for r in sparse] == [5, 10, 12]
    assert sparse == [each[r["step"]] for r in sparse]
    assert len(each) == 12 and len({r["loss"] for r in each.values()}) > 1


def test_nan_is_reported_at_the_next_fetch_with_its_first_step(mesh, step_fn, fetches):
    records = []
    with pytest.raises(loop.NonFiniteLoss) as err:
        loop.run_loop(step_fn=step_fn, state=fresh_state(mesh), frozen=FROZEN, batches=Batches(poison_at=2),
                      mesh=mesh, num_steps=30, log_every=10, progress=False, phase="q",
                      on_metrics=records.append)
    assert err.value.step == 3 and err.value.phase == "q" and not np.isfinite(err.value.value)
    assert records == [] and len(fetches) == 2  # the start, then the step-10 fetch that found it


def test_the_next_batch_is_on_the_devices_before_its_step(mesh, step_fn):
    """Batches reach the step as arrays placed on the mesh, pulled one step ahead: the
    batch of step s + 1 is pulled after step s was dispatched, before step s + 1."""
    events = []

    class Logged(Batches):
        def __next__(self):
            events.append(("pull", self.index))
            return super().__next__()

    def logged_step(state, frozen, batch):
        assert all(isinstance(v, jax.Array) and v.sharding.mesh == mesh for v in batch.values())
        events.append(("step", int(jax.device_get(state.step)) + 1))
        return step_fn(state, frozen, batch)

    loop.run_loop(step_fn=logged_step, state=fresh_state(mesh), frozen=FROZEN, batches=Logged(), mesh=mesh,
                  num_steps=4, progress=False)
    assert events == [("pull", 0), ("step", 1), ("pull", 1), ("step", 2), ("pull", 2), ("step", 3),
                      ("pull", 3), ("step", 4)]


def test_train_phase_logs_every_runtime_log_every(tmp_path, mesh):
    params, model_state = init_model(TinyNet())
    like = create_train_state(params, TX, model_state=model_state, rng=2)
    rt = Runtime(mesh, log=lambda m: None, metrics_path=tmp_path / "metrics.jsonl", save_every=100, log_every=3)
    train_phase("ph", tmp_path / "ck", like, FROZEN, make_loss_fn(TinyNet()), TX, Batches(), 7, rt)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [3, 6, 7]


def test_log_every_is_a_checked_config_key():
    base = to_dict(load_config("configs/mnist_alexnet.py"))
    assert base["checkpoint"]["log_every"] == 50
    validate_config(base)
    base["checkpoint"]["log_every"] = 0
    with pytest.raises(ConfigError, match=r"checkpoint.log_every=0 must be an int >= 1"):
        validate_config(base)
    for name in ("configs/alexnet_imagenet.py", "configs/mnist_sweep.py"):
        assert to_dict(load_config(name))["checkpoint"]["log_every"] >= 1
