"""Progressive tandem learning: plan coverage, frozen/trainable behaviour, optimizer state,
least squares, and a short PTL run that lowers every layer-wise target loss."""

import jax
import numpy as np
import pytest

from bnfree_jax.config_io import load_config
from bnfree_jax.distill.least_squares import fit_affine
from bnfree_jax.distill.plan import FROZEN, TRAINABLE, UNUSED, build_stage_plan
from bnfree_jax.distill.ptl import initial_trees, run_plan, stage_loss
from bnfree_jax.distill.stage_runner import run_stage, split, stage_state
from bnfree_jax.nn.network import STUDENT, TEACHER
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.pipeline.phases import Ledger
from bnfree_jax.pipeline.teacher import init_variables

TINY = ["model.name='tiny_cnn'", "data.max_train_examples=512", "data.max_test_examples=256",
        "ptl.batch=32", "teacher.batch=32", "qat.batch=32", "data.eval_batch=256",
        "ptl.optim.lr=0.003", "checkpoint.save_every=1000"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    config = load_config("configs/mnist_alexnet.py:quick", TINY)
    return make_context(config, tmp_path_factory.mktemp("distill"), log=lambda m: None)


@pytest.fixture(scope="module")
def qat_vars(ctx):
    net = ctx.network(TEACHER)
    v = init_variables(net, ctx.info, 0)
    rng = np.random.default_rng(0)
    for bs in v["batch_stats"].values():  # non-trivial BN so folding has work to do
        bs["bn"]["var"] = rng.uniform(0.5, 2.0, bs["bn"]["var"].shape).astype(np.float32)
    return v


def test_plan_covers_every_parameter_once_per_stage(ctx, qat_vars):
    names = [s.name for s in ctx.specs(True)]
    plan = build_stage_plan(ctx.config.ptl, names)
    assert [s.kind for s in plan] == ["local_init"] + ["tandem"] * len(names) + ["finetune"]
    trees = initial_trees(ctx, qat_vars, ctx.network(STUDENT), "fold", 0)
    for stage in plan:
        params, frozen, _ = split(stage, trees)
        for role, tree in (("S", trees.S), ("T", trees.T)):
            seen = [n for n in params[role]] + [n for n in frozen[role]]
            unused = [g.split(":")[1] for g, lab in stage.labels.items() if lab == UNUSED and g[0] == role]
            assert sorted(seen + unused) == sorted(tree), stage.name
            assert len(set(seen) | set(unused)) == len(seen) + len(unused), stage.name
        if stage.kind == "tandem":  # the tandem network uses S_1..S_l and T'_{l+1}..T'_L exactly
            l = stage.layer
            assert sorted(stage.groups(TRAINABLE)) == sorted([f"S:{names[l - 1]}"] + [f"T:{n}" for n in names[l:]])
            assert stage.groups(FROZEN) == [f"S:{n}" for n in names[: l - 1]]


def test_stage_trains_only_its_groups_and_keeps_no_frozen_moments(ctx, qat_vars):
    names = [s.name for s in ctx.specs(True)]
    stage = build_stage_plan(ctx.config.ptl, names)[2]  # tandem stage ℓ = 2
    stage = type(stage)(**{**stage.__dict__, "steps": 3})
    trees = initial_trees(ctx, qat_vars, ctx.network(STUDENT), "fold", 0)
    state, frozen, _ = stage_state(stage, trees, ctx.config.ptl.optim, 0)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert not any(f"'{names[0]}'" in p and "'S'" in p for p in opt_paths), "moments for a frozen layer"
    assert any(f"'{names[1]}'" in p for p in opt_paths)
    before = jax.device_get(trees)
    loss = stage_loss(ctx, stage, ctx.network(STUDENT), ctx.network(TEACHER))
    after, _ = run_stage(ctx, stage, trees, loss, ctx.config.ptl.optim, ctx.workdir / "ck_stage", seed=0)
    for a, b in zip(jax.tree.leaves(before.S[names[0]]), jax.tree.leaves(after.S[names[0]])):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # frozen S_1: bitwise unchanged
    changed = lambda x, y: any(not np.array_equal(np.asarray(p), np.asarray(q))
                               for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    assert changed(before.S[names[1]], after.S[names[1]])  # trainable S_2
    assert changed(before.T[names[2]], after.T[names[2]])  # compensating T'_3
    for a, b in zip(jax.tree.leaves(before.teacher), jax.tree.leaves(after.teacher)):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the original teacher is never modified


def test_least_squares_matches_numpy_lstsq():
    rng = np.random.default_rng(1)
    n, ch = 500, 3
    c = rng.normal(size=(n, ch))
    t = 1.7 * c + np.array([0.3, -0.2, 0.5]) + 0.05 * rng.normal(size=(n, ch))
    stats = np.stack([np.full(ch, n), c.sum(0), t.sum(0), (c * c).sum(0), (c * t).sum(0), (t * t).sum(0)])
    alpha, beta, rel = fit_affine(stats, per_channel=False)
    # numpy reference: one shared slope, one intercept per channel
    A = np.zeros((n * ch, 1 + ch))
    A[:, 0] = c.T.reshape(-1)
    for k in range(ch):
        A[k * n:(k + 1) * n, 1 + k] = 1
    sol, res, *_ = np.linalg.lstsq(A, t.T.reshape(-1), rcond=None)
    np.testing.assert_allclose(alpha, sol[0], rtol=1e-5)
    np.testing.assert_allclose(beta, sol[1:], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rel, res[0] / ((t - t.mean(0)) ** 2).sum(), rtol=1e-4)
    a_c, b_c, _ = fit_affine(stats, per_channel=True)
    for k in range(ch):
        slope, icpt = np.polyfit(c[:, k], t[:, k], 1)
        np.testing.assert_allclose([a_c[k], b_c[k]], [slope, icpt], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_short_ptl_lowers_every_layer_loss_and_student_is_bn_free(ctx, qat_vars):
    names = [s.name for s in ctx.specs(True)]
    cfg = ctx.config.ptl
    cfg.local_init_steps, cfg.stage_steps, cfg.finetune_steps = 5, 15, 5
    cfg.ce_weight = 0.0  # the fixture's teacher is untrained: match it, don't fight it
    cfg.optim.lr = 1e-3
    plan = build_stage_plan(cfg, names)
    # start far from the teacher (a random student, α/β least-squares fitted), so every stage
    # has real work to do
    plan = [plan[0].__class__(**{**plan[0].__dict__, "steps": 0})] + plan[1:]
    ledger = Ledger(ctx.workdir)
    student, records = run_plan(ctx, ledger, qat_vars, plan, variant="ptl_test", init="scratch")
    for rec in records:
        if rec["kind"] == "tandem":
            own = names[[r["name"] for r in records if r["kind"] == "tandem"].index(rec["name"])]
            assert rec["metrics"]["layer_mse"][own] < rec["metrics"]["layer_mse_start"], rec["name"]
    assert set(records[0]["metrics"]["least_squares_rel_residual"]) == set(names)
    flat = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(student)[0]]
    assert flat and not any("bn" in p or "batch_stats" in p for p in flat)
    assert ledger.done("ptl_test/finetune")
