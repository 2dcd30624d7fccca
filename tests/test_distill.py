"""Progressive tandem learning: plan coverage, frozen/trainable behaviour, optimizer state,
least squares, and a short PTL run that lowers every layer-wise target loss."""

import dataclasses

import jax
import numpy as np
import pytest

from bnfree_jax.config_io import load_config
from bnfree_jax.distill.least_squares import fit_affine
from bnfree_jax.distill.plan import FROZEN, SLOW, TRAINABLE, UNUSED, build_stage_plan
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
            assert sorted(stage.groups(TRAINABLE)) == sorted(f"T:{n}" for n in names[l:])
            assert stage.groups(SLOW) == [f"S:{names[l - 1]}"]  # own_layer_rate="slow" (default)
            # T'_ℓ stays, frozen, as S_ℓ's target ("tandem" layer targets, the default)
            assert sorted(stage.groups(FROZEN)) == sorted([f"S:{n}" for n in names[: l - 1]] + [f"T:{names[l - 1]}"])
    cfg = ctx.config.ptl.copy_and_resolve_references()
    cfg.layer_target = "teacher"  # the original teacher's path gives the target: T'_ℓ is not needed
    for stage in build_stage_plan(cfg, names)[1:-1]:
        assert stage.groups(FROZEN) == [f"S:{n}" for n in names[: stage.layer - 1]]


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
    ctx = dataclasses.replace(ctx, config=ctx.config.copy_and_resolve_references())  # leave the fixture's alone
    names = [s.name for s in ctx.specs(True)]
    cfg = ctx.config.ptl
    cfg.local_init_steps, cfg.stage_steps, cfg.finetune_steps = 5, 15, 5
    cfg.ce_weight = 0.0  # the fixture's teacher is untrained: match it, don't fight it
    cfg.optim.lr = 1e-3
    cfg.local_init = False  # start far from the targets, so every stage has real work to do:
    plan = build_stage_plan(cfg, names)  # a random S_1, and S_ℓ folded from T'_ℓ without the α/β fit
    ledger = Ledger(ctx.workdir)
    student, records = run_plan(ctx, ledger, qat_vars, plan, variant="ptl_test", init="scratch")
    for rec in records:
        if rec["kind"] == "tandem":
            own = names[[r["name"] for r in records if r["kind"] == "tandem"].index(rec["name"])]
            m = rec["metrics"]
            if own == names[-1]:  # S_L starts as an exact copy of T'_L (no BN to fold) and then
                assert m["layer_mse_start"] == 0.0  # trains on CE + KD as well: nothing to lower
                continue
            assert m["layer_mse_end"] < m["layer_mse_start"], rec["name"]
            assert m["layer_mse"][own] < 1.0, rec["name"]  # and it stays close to the original teacher
    assert all("handover_rel_residual" not in r["metrics"] for r in records)  # no refit without local init
    flat = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(student)[0]]
    assert flat and not any("bn" in p or "batch_stats" in p for p in flat)
    assert ledger.done("ptl_test/finetune")


def test_handover_carries_compensation_into_the_student(ctx, qat_vars):
    """After stage 1 trains T'_2 (compensation), stage 2's S_2 is folded from that trained
    T'_2, and its α, β are the least-squares fit to T'_2 on the student's own input."""
    from bnfree_jax.distill.fold import fold_layer
    from bnfree_jax.distill.handover import hand_over, needs_handover
    from bnfree_jax.distill.tandem import tandem_roles, tandem_variables

    names = [s.name for s in ctx.specs(True)]
    plan = build_stage_plan(ctx.config.ptl, names)
    assert [needs_handover(plan, k) for k in range(len(plan))] == [False, False] + [True] * (len(names) - 1) + [False]
    stage1 = type(plan[1])(**{**plan[1].__dict__, "steps": 4})
    trees = initial_trees(ctx, qat_vars, ctx.network(STUDENT), "fold", 0)
    loss = stage_loss(ctx, stage1, ctx.network(STUDENT), ctx.network(TEACHER))
    trees, _ = run_stage(ctx, stage1, trees, loss, ctx.config.ptl.optim, ctx.workdir / "ck_handover", seed=0)
    n2 = names[1]
    assert not np.array_equal(np.asarray(trees.T[n2]["kernel"]), np.asarray(qat_vars["params"][n2]["kernel"]))
    batches = ctx.train_batches(32, seed_offset=9)
    new, rel = hand_over(ctx, plan[2], trees, refit=True, batches=batches, num_batches=2)
    batches.close()
    spec = ctx.specs(True)[1]
    student_net = ctx.network(STUDENT)
    folded = fold_layer(spec, trees.T[n2], trees.Tbs[n2], None, student_net.per_channel)
    np.testing.assert_array_equal(np.asarray(new.S[n2]["kernel"]), folded["kernel"])
    # numpy least squares of T'_2(h) on S_2's raw op output over the same images
    batches = ctx.train_batches(32, seed_offset=9)
    images = np.concatenate([next(batches)["image"] for _ in range(2)])
    batches.close()
    L = len(names)
    net2, net1 = ctx.network(tandem_roles(L, 2)), ctx.network(tandem_roles(L, 1))
    unit = {**new.S, n2: {**new.S[n2], "alpha": np.float32(1.0), "beta": np.zeros_like(new.S[n2]["beta"])}}
    h = net2.apply(tandem_variables(net2.specs, 2, unit, trees.T, trees.Tbs), images, stop=1)
    _, c = net2.apply(tandem_variables(net2.specs, 2, unit, trees.T, trees.Tbs), h, start=1, stop=2, capture=True)
    _, t = net1.apply(tandem_variables(net1.specs, 1, new.S, trees.T, trees.Tbs), h, start=1, stop=2, capture=True)
    c = np.asarray(c[0][1], np.float64).reshape(-1, spec.features)
    t = np.asarray(t[0][1], np.float64).reshape(-1, spec.features)
    A = np.zeros((c.size, 1 + spec.features))
    A[:, 0] = c.T.reshape(-1)
    for k in range(spec.features):
        A[k * len(c):(k + 1) * len(c), 1 + k] = 1
    sol, res, *_ = np.linalg.lstsq(A, t.T.reshape(-1), rcond=None)
    np.testing.assert_allclose(new.S[n2]["alpha"], sol[0], rtol=1e-3)
    np.testing.assert_allclose(new.S[n2]["beta"], sol[1:], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(rel, res[0] / ((t - t.mean(0)) ** 2).sum(), rtol=1e-3)


@pytest.mark.slow
def test_head_stage_converts_the_last_layers_together(ctx, qat_vars):
    """ptl.head_layers=2: the last two layers are handed over in order and trained end to
    end in one stage of twice the steps; the prefix stays frozen; the budget is unchanged."""
    from bnfree_jax.distill.handover import hand_over_all
    from bnfree_jax.distill.plan import total_steps
    from bnfree_jax.pipeline.variables import load_variables

    ctx = dataclasses.replace(ctx, config=ctx.config.copy_and_resolve_references())
    names = [s.name for s in ctx.specs(True)]  # tiny_cnn: conv1, conv2, fc3
    cfg = ctx.config.ptl
    cfg.local_init_steps, cfg.stage_steps, cfg.finetune_steps = 2, 3, 0
    single = build_stage_plan(cfg, names)
    cfg.head_layers = 2
    plan = build_stage_plan(cfg, names)
    assert [s.name for s in plan] == ["local_init", "stage1_conv1", "stage2_conv2-fc3"]
    assert total_steps(plan) == total_steps(single) and plan[-1].steps == 6
    head = plan[-1]
    assert list(head.converts) == [2, 3] and head.layer_name == "fc3"
    assert head.groups(TRAINABLE) == ["S:conv2", "S:fc3"]
    assert sorted(head.groups(FROZEN)) == ["S:conv1", "T:fc3"] and not head.groups(SLOW)
    for bad in (0, len(names) + 1):
        wrong = cfg.copy_and_resolve_references()
        wrong.head_layers = bad
        with pytest.raises(ValueError, match="head_layers"):
            build_stage_plan(wrong, names)
    ledger = Ledger(ctx.workdir)
    student, records = run_plan(ctx, ledger, qat_vars, plan, variant="head_test")
    assert set(records[-1]["metrics"]["handover_rel_residual"]) == {"conv2", "fc3"}
    # redo the stage's hand-overs from the saved stage-1 trees, with the same batches
    init = initial_trees(ctx, qat_vars, ctx.network(STUDENT), "fold", 0)
    saved = load_variables(ctx.workdir / "head_test" / "stage1_conv1", {"S": init.S, "T": init.T})
    trees = dataclasses.replace(init, S=saved["S"], T=saved["T"])
    batches = ctx.train_batches(cfg.batch, seed_offset=200 + 2)
    handed, _ = hand_over_all(ctx, head, trees, refit=True, batches=batches)
    batches.close()
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
    assert all(np.array_equal(a, b) for a, b in zip(leaves(saved["S"]["conv1"]), leaves(student["conv1"])))
    for n in ("conv2", "fc3"):  # both head layers trained after their hand-over
        assert not np.array_equal(np.asarray(handed.S[n]["kernel"]), np.asarray(student[n]["kernel"])), n
        assert not np.array_equal(np.asarray(handed.S[n]["kernel"]), np.asarray(init.S[n]["kernel"])), n
