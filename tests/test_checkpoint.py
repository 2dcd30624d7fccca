"""Checkpoint round trip, fallback on corruption (to an older step, or to the phase's start when
no step is readable), exact resume, NaN and preemption stops."""

import glob
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multidevice_step import Batches, TinyNet, init_model, make_loss_fn, synthetic_batch  # noqa: E402

from bnfree_jax.train.phase import resume, train_phase  # noqa: E402
from bnfree_jax.train.runtime import Runtime  # noqa: E402
from bnfree_jax.train import (Checkpointer, NonFiniteLoss, Preempted, abstract_like,  # noqa: E402
                              create_train_state, make_mesh, make_train_step, preemption_guard,
                              put_replicated, run_loop)

TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.01, weight_decay=1e-3))
FROZEN = {"temp": jnp.float32(1.0)}


_STEPS = {}


def fresh(mesh):
    """A new state as a new process would build it, and the (pure, stateless) train step,
    compiled once per module to keep the tests fast."""
    model = TinyNet()
    params, model_state = init_model(model)
    state = put_replicated(create_train_state(params, TX, model_state=model_state, rng=5), mesh)
    if mesh not in _STEPS:
        _STEPS[mesh] = make_train_step(make_loss_fn(model), TX, mesh)
    return state, _STEPS[mesh]


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def state_like(mesh):
    return fresh(mesh)[0]


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


def test_round_trip_keeps_everything_including_the_typed_key(tmp_path, mesh):
    state, step = fresh(mesh)
    state, _ = step(state, FROZEN, {k: jnp.asarray(v) for k, v in synthetic_batch(4, 0).items()})
    expected = jax.device_get(state)
    with Checkpointer(tmp_path / "ck", save_every=1, keep=2) as ck:
        assert ck.save(1, state, {"stage": "s2", "data": {"index": 7}})
    ck2 = Checkpointer(tmp_path / "ck", save_every=1, keep=2)
    restored, extra, at = ck2.restore_latest(abstract_like(state, mesh))
    ck2.close()
    assert at == 1 and extra == {"stage": "s2", "data": {"index": 7}}
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(restored.rng)) == str(jax.random.key_impl(expected.rng))
    leaves_equal(restored, expected)
    assert Checkpointer(tmp_path / "empty", save_every=1).restore_latest(
        abstract_like(state, mesh)) is None


def _garble(paths):
    for p in paths:
        b = bytearray(open(p, "rb").read())
        for i in range(len(b) // 2, len(b)):
            b[i] ^= 0xA5
        open(p, "wb").write(bytes(b))


def _two_saved_steps(directory, state):
    """Steps 2 and 4 of `state` (params shifted by 2 and 4) saved in `directory`."""
    ck = Checkpointer(directory, save_every=2, keep=3, async_save=False)
    s2 = state.replace(step=jnp.int32(2), params=jax.tree.map(lambda x: x + 2, state.params))
    s4 = state.replace(step=jnp.int32(4), params=jax.tree.map(lambda x: x + 4, state.params))
    ck.save(2, s2, {"n": 2})
    ck.save(4, s4, {"n": 4})
    ck.close()
    return s2, s4


# A failed orbax read leaves an un-awaited coroutine behind; that noise is orbax's.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["garble", "delete"])
def test_corrupt_latest_falls_back_to_previous_and_says_so(tmp_path, mesh, damage):
    state, _ = fresh(mesh)
    s2, s4 = _two_saved_steps(tmp_path / "ck", state)
    data = glob.glob(str(tmp_path / "ck" / "4" / "state" / "d" / "*"))
    assert data
    if damage == "garble":
        _garble(data)
    else:
        for p in data:
            os.remove(p)
    messages = []
    ck = Checkpointer(tmp_path / "ck", save_every=2, keep=3, log=messages.append)
    restored, extra, at = ck.restore_latest(abstract_like(state, mesh))
    assert at == 2 and extra == {"n": 2}
    leaves_equal(restored.params, jax.device_get(s2.params))
    assert any("step 4" in m and "falling back" in m for m in messages), messages
    # The bad step is moved aside, so the run can write step 4 again.
    assert ck.all_steps() == [2] and os.path.isdir(tmp_path / "ck" / "4.corrupt")
    assert ck.save(4, s4, {"n": 4}, force=True)
    ck.close()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_step_moves_all_aside_and_the_phase_starts_from_its_beginning(tmp_path, mesh):
    state, step = fresh(mesh)
    s2, s4 = _two_saved_steps(tmp_path / "ck", state)
    data = {n: glob.glob(str(tmp_path / "ck" / str(n) / "state" / "d" / "*")) for n in (2, 4)}
    assert data[2] and data[4]
    _garble(data[4])  # the newest garbled, the older one's data gone: nothing is readable
    for p in data[2]:
        os.remove(p)
    messages = []
    ck = Checkpointer(tmp_path / "ck", save_every=2, keep=3, log=messages.append)
    assert ck.restore_latest(abstract_like(state, mesh)) is None  # no longer a RuntimeError
    assert ck.all_steps() == []
    assert sorted(os.listdir(tmp_path / "ck")) == ["2.corrupt", "4.corrupt"]
    assert [m for m in messages if "unreadable" in m and "falling back" in m and "step 4" in m]
    assert [m for m in messages if "unreadable" in m and "falling back" in m and "step 2" in m]
    start_over = [m for m in messages if "from its beginning" in m]
    assert len(start_over) == 1 and "[4, 2]" in start_over[0], messages
    ck.close()

    # The phase itself: its fresh start runs (once), is saved at step 0 beside the moved-aside
    # steps, and the phase trains to the very state an untouched fresh run reaches.
    ck = Checkpointer(tmp_path / "ck2", save_every=2, keep=3, async_save=False)
    ck.save(2, s2, {"n": 2})
    ck.close()
    _garble(glob.glob(str(tmp_path / "ck2" / "2" / "state" / "d" / "*")))
    messages.clear()
    starts = []

    def start():
        starts.append(1)
        return fresh(mesh)[0], {"fit": "closed form"}

    rt = Runtime(mesh, log=messages.append, save_every=2, keep=3)
    final, record = train_phase("p", tmp_path / "ck2", state_like(mesh), FROZEN, make_loss_fn(TinyNet()), TX,
                                Batches(), 3, rt, start=start)
    assert starts == [1] and record == {"fit": "closed form"}
    assert len([m for m in messages if "from its beginning" in m]) == 1, messages
    assert sorted(os.listdir(tmp_path / "ck2")) == ["0", "2", "2.corrupt", "3"]
    state, step = fresh(mesh)
    untouched = run_loop(step_fn=step, state=state, frozen=FROZEN, batches=Batches(), mesh=mesh,
                         num_steps=3, progress=False)
    assert int(final.step) == 3
    leaves_equal(final.params, untouched.params)
    leaves_equal(final.opt_state, untouched.opt_state)


def test_resume_is_bitwise_exact(tmp_path, mesh):
    n, k = 6, 3
    state, step = fresh(mesh)
    full = run_loop(step_fn=step, state=state, frozen=FROZEN, batches=Batches(), mesh=mesh,
                    num_steps=n, progress=False)

    # First run stops after k steps (its checkpoint), then everything is rebuilt.
    it = Batches()
    ck = Checkpointer(tmp_path / "ck", save_every=k, keep=2)
    state, step = fresh(mesh)
    run_loop(step_fn=step, state=state, frozen=FROZEN, batches=it, data_iterator=it, mesh=mesh,
             num_steps=k, checkpointer=ck, extra={"stage": "a"}, progress=False)
    ck.close()
    it = Batches()
    ck = Checkpointer(tmp_path / "ck", save_every=k, keep=2)
    state, step = fresh(mesh)
    state, extra, _ = resume(ck, state, Runtime(mesh), "stage_a", it)
    assert int(state.step) == k and it.index == k and extra["stage"] == "a"
    metrics = tmp_path / "m.jsonl"
    resumed = run_loop(step_fn=step, state=state, frozen=FROZEN, batches=it, data_iterator=it,
                       mesh=mesh, num_steps=n, checkpointer=ck, metrics_path=metrics,
                       phase="stage_a", log_every=1, progress=True)
    ck.close()
    assert int(resumed.step) == n
    leaves_equal(resumed.params, full.params)
    leaves_equal(resumed.model_state, full.model_state)
    leaves_equal(resumed.opt_state, full.opt_state)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full.params),
                                                        jax.tree.leaves(fresh(mesh)[0].params)))
    lines = [json.loads(x) for x in open(metrics)]
    assert [r["step"] for r in lines] == [4, 5, 6]
    assert all(r["phase"] == "stage_a" and np.isfinite(r["loss"]) and "acc" in r for r in lines)


def test_nan_loss_stops_without_saving_that_step(tmp_path, mesh):
    state, step = fresh(mesh)
    ck = Checkpointer(tmp_path / "ck", save_every=2, keep=5)
    it = Batches(poison_at=3)  # the 4th batch, i.e. step 4, a save step
    with pytest.raises(NonFiniteLoss) as err:
        run_loop(step_fn=step, state=state, frozen=FROZEN, batches=it, data_iterator=it,
                 mesh=mesh, num_steps=6, checkpointer=ck, phase="stage3", progress=False)
    assert err.value.step == 4 and err.value.phase == "stage3"
    msg = str(err.value)
    assert "step 4" in msg and "stage3" in msg and "\n" not in msg
    ck.close()
    ck = Checkpointer(tmp_path / "ck", save_every=2)
    assert ck.all_steps() == [2]
    # The step-2 checkpoint was written asynchronously while later steps donated the
    # state's buffers; it must still hold exactly the step-2 state.
    restored, extra, at = ck.restore_latest(abstract_like(state_like(mesh), mesh))
    ck.close()
    state, step = fresh(mesh)
    two = run_loop(step_fn=step, state=state, frozen=FROZEN, batches=Batches(), mesh=mesh,
                   num_steps=2, progress=False)
    assert at == 2 and extra["data"] == {"index": 2} and extra["phase"] == "stage3"
    leaves_equal(restored, two)


def test_sigterm_saves_then_raises_preempted(tmp_path, mesh):
    state, step = fresh(mesh)
    before = signal.getsignal(signal.SIGTERM)
    ck = Checkpointer(tmp_path / "ck", save_every=100, keep=2)
    it = Batches(on_index=lambda i: i == 2 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Preempted) as err:
        run_loop(step_fn=step, state=state, frozen=FROZEN, batches=it, data_iterator=it,
                 mesh=mesh, num_steps=50, checkpointer=ck, phase="teacher", progress=False)
    assert err.value.step == 3 and err.value.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    ck.close()
    ck = Checkpointer(tmp_path / "ck", save_every=100)
    restored, extra, at = ck.restore_latest(abstract_like(fresh(mesh)[0], mesh))
    assert at == 3 and int(restored.step) == 3
    assert extra["data"] == {"index": 3} and extra["phase"] == "teacher"
    ck.close()


def test_preemption_guard_flags_sigint_and_restores_handlers():
    before = signal.getsignal(signal.SIGINT)
    with preemption_guard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested and guard.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before
