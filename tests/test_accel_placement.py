"""Frozen trees live on the mesh: a phase places its state and everything it does not train
(the original teacher, the frozen prefix, frozen T' groups) on the mesh once, replicated as
the step expects, so that its steps run with host→device transfers disallowed."""

import dataclasses
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multidevice_step import TinyNet, init_model, make_loss_fn, synthetic_batch  # noqa: E402

from bnfree_jax.config_io import load_config  # noqa: E402
from bnfree_jax.distill.plan import build_stage_plan  # noqa: E402
from bnfree_jax.distill.ptl import stage_loss  # noqa: E402
from bnfree_jax.distill.stage_runner import Trees, run_stage  # noqa: E402
from bnfree_jax.nn.factory import NetFactory  # noqa: E402
from bnfree_jax.nn.network import STUDENT, TEACHER  # noqa: E402
from bnfree_jax.nn.zoo import get_layer_specs  # noqa: E402
from bnfree_jax.train import phase  # noqa: E402
from bnfree_jax.train.mesh import make_mesh, replicated  # noqa: E402
from bnfree_jax.train.runtime import Runtime  # noqa: E402
from bnfree_jax.train.state import create_train_state  # noqa: E402
from bnfree_jax.train.supervised import init_variables  # noqa: E402

CONFIG = load_config("configs/mnist_alexnet.py:quick", ["model.name='tiny_cnn'", "ptl.batch=8"])


class Stream:
    """A checkpointable stream of host numpy MNIST-shaped batches (what a feed yields)."""

    def __init__(self, batch, seed, image_shape=(28, 28, 1)):
        self.batch, self.seed, self.shape, self.index = batch, seed, image_shape, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng((self.seed, self.index))
        self.index += 1
        return {"image": rng.integers(0, 256, (self.batch, *self.shape), dtype=np.uint8),
                "label": rng.integers(0, 10, (self.batch,), dtype=np.int32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])

    def close(self):
        pass


@pytest.fixture
def guarded_loop(monkeypatch):
    """The phase's loop run with implicit host→device transfers disallowed (batches are
    placed explicitly by the loop); records where its state and frozen tree live."""
    seen = []
    real = phase.run_loop

    def run_loop(**kw):
        seen.append({"state": kw["state"], "frozen": kw["frozen"]})
        with jax.transfer_guard_host_to_device("disallow"):
            return real(**kw)

    monkeypatch.setattr(phase, "run_loop", run_loop)
    return seen


def _replicated_on(tree, mesh) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(replicated(mesh), x.ndim)
                                for x in leaves)


def _env(tmp_path, mesh):
    m = CONFIG.model
    nets = NetFactory(float_specs=tuple(get_layer_specs(m.name, 10)),
                      quant_specs=tuple(get_layer_specs(m.name, 10, m.w_bits, m.a_bits, m.first_last_w_bits)),
                      mean=(0.13,), std=(0.31,), image_shape=(28, 28, 1))
    feed = types.SimpleNamespace(train_batches=lambda batch, seed, mesh: Stream(batch, seed))
    rt = Runtime(mesh, log=lambda m: None, metrics_path=tmp_path / "metrics.jsonl", save_every=2, log_every=2)
    return types.SimpleNamespace(nets=nets, rt=rt, feed=feed, ptl=CONFIG.ptl, seed=0)


def test_a_ptl_stage_steps_with_host_to_device_transfers_disallowed(tmp_path, guarded_loop):
    mesh = make_mesh()
    env = _env(tmp_path, mesh)
    teacher_net = env.nets.network(TEACHER)
    qat = init_variables(teacher_net, (28, 28, 1), jax.random.key(0))
    student = init_variables(env.nets.network(STUDENT), (28, 28, 1), jax.random.key(1))["params"]
    trees = Trees(S=student, T=dict(qat["params"]), Tbs=dict(qat["batch_stats"]), teacher=qat)
    plan = build_stage_plan(CONFIG.ptl, env.nets.layer_names)
    stage = dataclasses.replace(next(s for s in plan if s.kind == "tandem" and s.layer == 2), steps=3)
    loss = stage_loss(env, stage, env.nets.network(STUDENT), teacher_net)
    _, final, _ = run_stage(env, stage, trees, loss, CONFIG.ptl.optim, tmp_path / "ck")
    assert int(final.step) == 3
    (placed,) = guarded_loop
    frozen = placed["frozen"]
    assert sorted(frozen["S"]) == [env.nets.layer_names[0]]  # the frozen prefix, the teacher, T'
    assert _replicated_on(frozen, mesh) and _replicated_on(placed["state"], mesh)
    np.testing.assert_array_equal(np.asarray(frozen["teacher"]["params"]["conv1"]["kernel"]),
                                  qat["params"]["conv1"]["kernel"])  # placed as is


def test_a_fresh_phase_state_is_placed_before_its_steps(tmp_path, guarded_loop):
    """A phase without a `start` (the teacher, QAT) starts from a host state: placed too."""
    mesh = make_mesh()
    params, model_state = init_model(TinyNet())
    import optax
    tx = optax.sgd(0.1)
    like = create_train_state(params, tx, model_state=model_state, rng=3)
    rt = Runtime(mesh, log=lambda m: None, save_every=100)
    frozen = {"temp": np.float32(1.0)}  # host numpy: crosses once, not per step

    class Batches(Stream):
        def __next__(self):
            self.index += 1
            return synthetic_batch(4, self.index)

    state, _ = phase.train_phase("teacher", tmp_path / "ck", like, frozen, make_loss_fn(TinyNet()), tx,
                                 Batches(4, 0), 3, rt)
    assert int(state.step) == 3
    assert _replicated_on(guarded_loop[0]["state"], mesh) and _replicated_on(guarded_loop[0]["frozen"], mesh)
    assert jnp.dtype(guarded_loop[0]["frozen"]["temp"].dtype) == jnp.float32
