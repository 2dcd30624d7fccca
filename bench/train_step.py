"""Training-step throughput of the project's own steps on alexnet_cifar (project venv).

(i) float BN teacher step, (ii) W4A4 QAT step (fake-quant, BN, first/last 8-bit),
(iii) a middle PTL tandem stage: tandem forward/backward + S_ℓ's target from T'_ℓ + Adam
update, with the teacher's logits read from the batch (teacher cache) and, for the ratio
`teacher_cache_speedup`, computed by a teacher forward in the step, built with the real distill code (make_tandem_loss, stage split, make_train_step)
on a one-device mesh. Prints images/s per step kind and fakequant_overhead = t(W4A4)/t(float).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from _common import emit, machine, rate, time_per_call  # noqa: E402
from bnfree_jax.config_io import load_config, with_added  # noqa: E402
from bnfree_jax.distill.plan import FROZEN, build_stage_plan  # noqa: E402
from bnfree_jax.distill.stage_runner import Trees, split  # noqa: E402
from bnfree_jax.distill.tandem import make_tandem_loss, tandem_roles  # noqa: E402
from bnfree_jax.nn.network import STUDENT, TEACHER, make_network  # noqa: E402
from bnfree_jax.nn.zoo import alexnet_cifar, with_bits  # noqa: E402
from bnfree_jax.train.supervised import classification_loss  # noqa: E402
from bnfree_jax.train.mesh import make_mesh, put_replicated, shard_batch  # noqa: E402
from bnfree_jax.train.state import create_train_state  # noqa: E402
from bnfree_jax.train.step import make_train_step  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
PTL_CFG = with_added(load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "configs", "mnist_alexnet.py"),
                                   ["ptl.local_init=False", "ptl.stage_steps=1", "ptl.finetune_steps=0",
                                    "ptl.prefix=frozen"]), "ptl")  # the project's PTL settings, one step a stage


def _batch(mesh, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return shard_batch({"image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
                        "label": rng.integers(0, 10, (batch,), dtype=np.int32)}, mesh)


def _init(net, seed: int):
    return jax.device_get(net.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False))


def _timed_step(step_fn, state, frozen, batch, repeats: int, inner: int):
    """Median seconds per step; the state is threaded through (its buffers are donated)."""
    box = {"state": state}

    def one():
        box["state"], metrics = step_fn(box["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return time_per_call(one, repeats=repeats, inner=inner, warmup=2)


def bn_step(mesh, specs, batch, repeats, inner):
    """One BN-network classification step (the float teacher or the QAT teacher)."""
    net = make_network(specs, TEACHER, MEAN, STD, bn_axis_name="data")
    v = _init(net, 0)
    tx = optax.adam(1e-3)
    state = put_replicated(create_train_state(v["params"], tx, model_state={"batch_stats": v["batch_stats"]}), mesh)
    step = make_train_step(classification_loss(net), tx, mesh)
    return _timed_step(step, state, {}, batch, repeats, inner)


def ptl_step(mesh, specs, batch, repeats, inner, layer: int, cached: bool):
    """Stage `layer` of PTL: S_layer trainable, S_1..S_{layer-1} frozen, T' downstream trainable,
    S_layer's target T'_layer on its own input (the default). `cached`: the batch carries the
    teacher's logits (the teacher cache, as with no augmentation); otherwise the step runs the
    whole teacher forward for them."""
    teacher = make_network(specs, TEACHER, MEAN, STD)
    student = make_network(specs, STUDENT, MEAN, STD)
    tv, sv = _init(teacher, 1), _init(student, 2)
    trees = Trees(S=sv["params"], T=dict(tv["params"]), Tbs=dict(tv["batch_stats"]), teacher=tv)
    stage = build_stage_plan(PTL_CFG, [s.name for s in specs])[layer - 1]
    params, frozen, _ = split(stage, trees)
    L = len(specs)
    tandem = make_network(specs, tandem_roles(L, layer), MEAN, STD)
    target_net = make_network(specs, tandem_roles(L, layer - 1), MEAN, STD)
    prefix_frozen = all(stage.labels[f"S:{s.name}"] == FROZEN for s in specs[:layer - 1])
    loss_fn = make_tandem_loss(tandem, target_net, teacher, layer, stage.losses, 4.0, prefix_frozen)
    tx = optax.adam(1e-3)
    state = put_replicated(create_train_state(params, tx), mesh)
    step = make_train_step(loss_fn, tx, mesh)
    if cached:
        logits = jax.jit(lambda v, x: teacher.apply(v, x, train=False))(tv, batch["image"])
        batch = {**batch, "t_logits": jax.device_put(logits, batch["image"].sharding)}
    return _timed_step(step, state, put_replicated(frozen, mesh), batch, repeats, inner)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--stage", type=int, default=3, help="PTL stage (1-based layer) to time")
    args = ap.parse_args(argv)
    mesh = make_mesh(jax.devices()[:1])
    batch = _batch(mesh, args.batch)
    base = alexnet_cifar(10)
    q = with_bits(base, 4, 4, 8)
    t_float, runs_float = bn_step(mesh, with_bits(base, 32, 32), batch, args.repeats, args.inner)
    t_qat, runs_qat = bn_step(mesh, q, batch, args.repeats, args.inner)
    t_ptl, runs_ptl = ptl_step(mesh, q, batch, args.repeats, args.inner, args.stage, cached=True)
    t_ptl_nc, runs_ptl_nc = ptl_step(mesh, q, batch, args.repeats, args.inner, args.stage, cached=False)
    emit({"bench": "train_step", "batch": args.batch, "model": "alexnet_cifar", "ptl_stage": args.stage,
          "float_step_images_per_s": rate(args.batch, t_float),
          "w4a4_qat_step_images_per_s": rate(args.batch, t_qat),
          "ptl_step_images_per_s": rate(args.batch, t_ptl),
          "ptl_step_uncached_images_per_s": rate(args.batch, t_ptl_nc),
          "teacher_cache_speedup": round(t_ptl_nc / t_ptl, 3),
          "fakequant_overhead": round(t_qat / t_float, 3),
          "runs_s": {"float": runs_float, "w4a4": runs_qat, "ptl": runs_ptl, "ptl_uncached": runs_ptl_nc},
          "jax": jax.__version__, "machine": machine()})


if __name__ == "__main__":
    main()
