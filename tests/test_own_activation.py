"""ptl.train_own_activation: the downstream loss of stage ℓ reaches S_ℓ's activation
quantizer (the gradient with respect to its clip `act_alpha`), and nothing else of S_ℓ."""

import dataclasses
import io
from contextlib import closing

import jax
import ml_collections
import numpy as np
import pytest
from rich.console import Console

from bnfree_jax.config_io import ConfigError, changed_keys, load_config, to_dict, with_added
from bnfree_jax.distill.losses import task_losses
from bnfree_jax.distill.plan import ACT_ALPHA, SLOW, TRAINABLE, build_stage_plan, plan_table
from bnfree_jax.distill.ptl import initial_trees, run_plan, stage_loss
from bnfree_jax.distill.stage_runner import split
from bnfree_jax.distill.tandem import merged, tandem_variables
from bnfree_jax.nn.network import STUDENT, TEACHER
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.validate import validate_config
from bnfree_jax.train.streams import stream_key, stream_seed
from bnfree_jax.train.supervised import init_variables

TINY = ["model.name='tiny_cnn'", "data.max_train_examples=256", "data.max_test_examples=128",
        "ptl.batch=32", "data.eval_batch=128", "checkpoint.save_every=1000"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    config = load_config("configs/mnist_alexnet.py:quick", TINY)
    return make_context(config, tmp_path_factory.mktemp("own_act"), log=lambda m: None)


@pytest.fixture(scope="module")
def qat_vars(ctx):
    net = ctx.nets.network(TEACHER)
    v = init_variables(net, ctx.nets.image_shape, stream_key(ctx.env.seed, "qat/init"))
    rng = np.random.default_rng(0)
    for bs in v["batch_stats"].values():  # non-trivial BN so the fold has work to do
        bs["bn"]["var"] = rng.uniform(0.5, 2.0, bs["bn"]["var"].shape).astype(np.float32)
    return v


@pytest.fixture(scope="module")
def batch(ctx):
    with closing(ctx.feed.train_batches(32, stream_seed(ctx.env.seed, "test/own_act"), ctx.rt.mesh)) as it:
        return next(it)


def _env(ctx, on: bool, **changes):
    cfg = ctx.config.ptl.copy_and_resolve_references()
    cfg.train_own_activation = on
    for k, v in changes.items():
        setattr(cfg, k, v)
    return dataclasses.replace(ctx.env, ptl=cfg)


def _stage(ctx, on: bool):
    """Stage 1 of the plan (conv1 converted, conv2 and fc3 downstream)."""
    return next(s for s in build_stage_plan(_env(ctx, on).ptl, ctx.nets.layer_names) if s.kind == "tandem")


@pytest.fixture(scope="module")
def grads(ctx, qat_vars, batch):
    """{on: (stage 1, its trainable params, frozen tree, optimizer labels, gradient of its loss)}."""
    out = {}
    for on in (False, True):
        stage, env = _stage(ctx, on), _env(ctx, on)
        params, frozen, labels = split(stage, initial_trees(env, qat_vars, "fold"))
        loss = stage_loss(env, stage, ctx.nets.network(STUDENT), ctx.nets.network(TEACHER))
        g = jax.jit(jax.grad(lambda p, fr, b: loss(p, {}, fr, b, None)[0]))(params, frozen, batch)
        out[on] = stage, params, frozen, labels, g
    return out


def test_plan_marks_the_own_activation_of_every_stage_with_something_downstream(ctx):
    names = ctx.nets.layer_names  # tiny_cnn: conv1, conv2, fc3
    on = [s for s in build_stage_plan(_env(ctx, True).ptl, names) if s.kind == "tandem"]
    assert [s.own_activation for s in on] == [True, True, False]  # S_L makes the logits itself
    off = build_stage_plan(_env(ctx, False).ptl, names)
    assert not any(s.own_activation for s in off)
    assert [s.labels for s in off] == [s.labels for s in build_stage_plan(_env(ctx, True).ptl, names)]
    head = next(s for s in build_stage_plan(_env(ctx, True, head_layers=2).ptl, names) if s.first)
    assert head.converts == range(2, 4) and not head.own_activation  # end to end already
    console = Console(record=True, width=300, file=io.StringIO())
    console.print(plan_table(on))
    assert "S:conv1.act_alpha" in console.export_text()


def test_key_is_checked_and_an_older_config_without_it_runs_off(ctx):
    with pytest.raises(ConfigError, match=r"ptl.train_own_activation='yes': expected bool"):
        validate_config(load_config("configs/mnist_alexnet.py", ["ptl.train_own_activation=yes"]))
    old = load_config("configs/mnist_alexnet.py").to_dict()
    del old["ptl"]["train_own_activation"]
    validate_config(ml_collections.ConfigDict(old))
    assert not any(s.own_activation for s in build_stage_plan(with_added(ml_collections.ConfigDict(old), "ptl"),
                                                              ctx.nets.layer_names))
    new = to_dict(load_config("configs/mnist_alexnet.py"))
    assert changed_keys(old, new) == []  # a workdir pinned before the key resumes
    assert changed_keys(old, to_dict(load_config("configs/mnist_alexnet.py", ["ptl.train_own_activation=True"]))) \
        == ["ptl.train_own_activation"]


def test_own_act_alpha_trains_at_the_full_rate_the_rest_of_s_l_slow(grads):
    stage, params, _, labels, _ = grads[True]
    own = stage.layer_name
    assert ACT_ALPHA in params["S"][own]  # among the stage's trainable parameters
    assert labels["S"][own][ACT_ALPHA] == TRAINABLE
    assert {labels["S"][own][k] for k in ("kernel", "alpha", "beta")} == {SLOW}  # own_layer_rate="slow"
    off_labels = grads[False][3]
    assert off_labels["S"][own][ACT_ALPHA] == SLOW


def test_downstream_loss_reaches_own_act_alpha_only_when_on(ctx, batch, grads):
    stage, params, frozen, _, g_on = grads[True]
    g_off = grads[False][4]
    own, l = stage.layer_name, stage.layer
    assert float(g_off["S"][own][ACT_ALPHA]) == 0.0
    got = float(g_on["S"][own][ACT_ALPHA])
    assert got != 0.0
    # the same derivative straight from the composed function: the tandem network's task
    # loss as a function of S_ℓ's clip (the layer-wise MSE does not depend on it)
    net = ctx.nets.network(tuple(STUDENT if i < l else TEACHER for i in range(len(ctx.nets.layer_names))))
    t_logits = batch["t_logits"] if "t_logits" in batch else \
        ctx.nets.network(TEACHER).apply(frozen["teacher"], batch["image"], train=False)

    def downstream(a):
        S = merged(params, frozen, "S")
        S = {**S, own: {**S[own], ACT_ALPHA: a}}
        variables = tandem_variables(net.specs, l, S, merged(params, frozen, "T"), frozen["Tbs"])
        logits = net.apply(variables, batch["image"])
        return task_losses(logits, batch["label"], t_logits, stage.losses, ctx.config.ptl.kd_temperature)[0]

    want = float(jax.jit(jax.grad(downstream))(params["S"][own][ACT_ALPHA]))
    assert want != 0.0
    assert got == pytest.approx(want, rel=1e-4)
    # S_ℓ's pre-activation parameters and the compensating T' see the same gradients as off
    for k in ("kernel", "alpha", "beta"):
        np.testing.assert_allclose(g_on["S"][own][k], g_off["S"][own][k], rtol=1e-5, atol=1e-8)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), g_on["T"], g_off["T"])


def test_short_run_with_it_on_gives_different_stage_metrics(ctx, qat_vars):
    """Off, S_ℓ's clip never moves in its stage (the complaint: the stage metrics did not
    depend on the student's activation quantizer); on, it trains and the metrics differ."""
    runs = {}
    for on in (False, True):
        env = _env(ctx, on, local_init=False, stage_steps=4, finetune_steps=0)
        plan = build_stage_plan(env.ptl, ctx.nets.layer_names)[:2]  # the stages with something downstream
        variant = f"own_act_{on}"
        student, records = run_plan(env, qat_vars, plan, records=Ledger(ctx.workdir / variant),
                                    out_dir=ctx.workdir / variant,
                                    ckpt_dir=ctx.workdir / "checkpoints" / variant, variant=variant)
        runs[on] = student, [r["metrics"] for r in records]
    first = ctx.nets.layer_names[0]  # converted in stage 1 (folded, no local init), frozen after it
    start = np.asarray(qat_vars["params"][first][ACT_ALPHA])
    assert np.array_equal(np.asarray(runs[False][0][first][ACT_ALPHA]), start)
    assert not np.array_equal(np.asarray(runs[True][0][first][ACT_ALPHA]), start)
    off, on = runs[False][1], runs[True][1]
    assert len(on) == len(off) == 2
    assert all(a != b for a, b in zip(on, off)), "a stage's metrics did not change"
