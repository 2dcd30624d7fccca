"""Progressive tandem learning: plan coverage, frozen/trainable behaviour, optimizer state,
least squares, and a short PTL run that lowers every layer-wise target loss."""

import dataclasses
from contextlib import closing

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
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.train.streams import stream_key, stream_seed
from bnfree_jax.train.supervised import init_variables

TINY = ["model.name='tiny_cnn'", "data.max_train_examples=512", "data.max_test_examples=256",
        "ptl.batch=32", "teacher.batch=32", "qat.batch=32", "data.eval_batch=256",
        "ptl.optim.lr=0.003", "checkpoint.save_every=1000"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    config = load_config("configs/mnist_alexnet.py:quick", TINY)
    return make_context(config, tmp_path_factory.mktemp("distill"), log=lambda m: None)


@pytest.fixture(scope="module")
def env(ctx):
    return ctx.env


@pytest.fixture(scope="module")
def qat_vars(ctx):
    net = ctx.nets.network(TEACHER)
    v = init_variables(net, ctx.nets.image_shape, stream_key(ctx.env.seed, "qat/init"))
    rng = np.random.default_rng(0)
    for bs in v["batch_stats"].values():  # non-trivial BN so folding has work to do
        bs["bn"]["var"] = rng.uniform(0.5, 2.0, bs["bn"]["var"].shape).astype(np.float32)
    return v


def test_plan_covers_every_parameter_once_per_stage(ctx, env, qat_vars):
    names = ctx.nets.layer_names
    plan = build_stage_plan(ctx.config.ptl, names)
    assert [s.kind for s in plan] == ["local_init"] + ["tandem"] * len(names) + ["finetune"]
    trees = initial_trees(env, qat_vars, "fold")
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


def _copy(tree):
    """An independent host copy of `tree`'s arrays, to compare a later state against."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _bitwise_equal(x, y) -> bool:
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    return len(lx) == len(ly) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lx, ly))


def test_stage_trains_only_its_groups_and_keeps_no_frozen_moments(ctx, env, qat_vars):
    names = ctx.nets.layer_names
    stage = dataclasses.replace(build_stage_plan(ctx.config.ptl, names)[2], steps=3)  # tandem stage ℓ = 2
    trees = initial_trees(env, qat_vars, "fold")
    state, frozen, _ = stage_state(stage, trees, ctx.config.ptl.optim, env.seed)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert not any(f"'{names[0]}'" in p and "'S'" in p for p in opt_paths), "moments for a frozen layer"
    assert any(f"'{names[1]}'" in p for p in opt_paths)
    loss = stage_loss(env, stage, ctx.nets.network(STUDENT), ctx.nets.network(TEACHER))
    # The frozen S_1 is on the stage's path: the stage loss depends on it (so keeping it
    # unchanged below is the optimizer's doing, not a layer the stage never reads).
    params, _, _ = split(stage, trees)
    with closing(env.feed.train_batches(32, stream_seed(env.seed, "test/stage_probe"), env.rt.mesh)) as it:
        batch = next(it)
    rng = stream_key(env.seed, "test/stage_probe")
    k1 = np.asarray(frozen["S"][names[0]]["kernel"])
    k1 = k1 + np.random.default_rng(0).normal(0, k1.std(), k1.shape).astype(k1.dtype)
    nudged = {**frozen, "S": {**frozen["S"], names[0]: {**frozen["S"][names[0]], "kernel": k1}}}
    assert float(loss(params, {}, nudged, batch, rng)[0]) != float(loss(params, {}, frozen, batch, rng)[0])
    # Independent copies taken before training. (`jax.device_get(trees)` returns the very
    # same host arrays, so comparing the frozen leaves with it compared objects with themselves.)
    before = _copy({"S": trees.S, "T": trees.T, "teacher": trees.teacher})
    after, final, _ = run_stage(env, stage, trees, loss, ctx.config.ptl.optim, ctx.workdir / "ck_stage")
    assert int(final.step) == 3
    assert sorted(final.params["S"]) == [names[1]] and sorted(final.params["T"]) == sorted(names[2:])
    assert _bitwise_equal(after.S[names[0]], before["S"][names[0]])  # frozen S_1: bitwise unchanged
    assert _bitwise_equal(after.T[names[1]], before["T"][names[1]])  # frozen target T'_2 likewise
    assert _bitwise_equal(after.teacher, before["teacher"])  # the original teacher is never modified
    assert not _bitwise_equal(after.S[names[1]], before["S"][names[1]])  # trainable (slow) S_2
    assert not _bitwise_equal(after.T[names[2]], before["T"][names[2]])  # compensating T'_3
    # what the stage returns is what it trained
    assert _bitwise_equal(after.S[names[1]], jax.device_get(final.params["S"][names[1]]))
    assert _bitwise_equal(after.T[names[2]], jax.device_get(final.params["T"][names[2]]))


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


def _with_ptl(ctx, **changes):
    """The job's env with a private copy of its `ptl` section (the fixture's stays as it is)."""
    cfg = ctx.config.ptl.copy_and_resolve_references()
    for k, v in changes.items():
        setattr(cfg, k, v)
    return dataclasses.replace(ctx.env, ptl=cfg)


@pytest.mark.slow
def test_short_ptl_lowers_every_layer_loss_and_student_is_bn_free(ctx, qat_vars):
    names = ctx.nets.layer_names
    env = _with_ptl(ctx, local_init_steps=5, stage_steps=15, finetune_steps=5,
                    ce_weight=0.0,  # the fixture's teacher is untrained: match it, don't fight it
                    local_init=False)  # start far from the targets, so every stage has real work to do:
    env.ptl.optim.lr = 1e-3
    plan = build_stage_plan(env.ptl, names)  # a random S_1, and S_ℓ folded from T'_ℓ without the α/β fit
    ledger = Ledger(ctx.workdir)
    student, records = run_plan(env, qat_vars, plan, records=ledger, out_dir=ctx.workdir / "ptl_test",
                                ckpt_dir=ctx.workdir / "checkpoints" / "ptl_test", variant="ptl_test",
                                init="scratch")
    assert [r["name"] for r in records] == [s.name for s in plan]
    tandem = [r for r in records if r["kind"] == "tandem"]
    assert len(tandem) == len(names)
    for l, rec in enumerate(tandem, start=1):
        own, m = names[l - 1], rec["metrics"]
        assert sorted(m["layer_mse"]) == sorted(names[:l]), rec["name"]
        # the frozen prefix S_1..S_{ℓ-1} is where the earlier stages left it: its error to the
        # original teacher is the one the previous stage recorded
        if l > 1:
            prev = tandem[l - 2]["metrics"]["layer_mse"]
            for n in names[: l - 1]:
                assert m["layer_mse"][n] == pytest.approx(prev[n], rel=1e-5), (rec["name"], n)
        if own == names[-1]:  # S_L starts as an exact copy of T'_L (no BN to fold) and then
            assert m["layer_mse_start"] == 0.0  # trains on CE + KD as well: nothing to lower
            continue
        assert m["layer_mse_end"] < m["layer_mse_start"], rec["name"]
    # Stage 1's target T'_1 is the original teacher's first layer (nothing trained it before:
    # no local init), on the same input (the images): its own-layer error and its error to the
    # original teacher, computed on two paths, are one number.
    m1 = tandem[0]["metrics"]
    assert m1["layer_mse"][names[0]] == pytest.approx(m1["layer_mse_end"], rel=1e-5)
    assert all("handover_rel_residual" not in r["metrics"] for r in records)  # no refit without local init
    flat = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(student)[0]]
    assert flat and not any("bn" in p or "batch_stats" in p for p in flat)
    assert ledger.done("ptl_test/finetune")


def test_handover_carries_compensation_into_the_student(ctx, env, qat_vars):
    """After stage 1 trains T'_2 (compensation), stage 2's S_2 is folded from that trained
    T'_2, and its α, β are the least-squares fit to T'_2 on the student's own input."""
    from bnfree_jax.distill.fold import fold_layer
    from bnfree_jax.distill.handover import hand_over, needs_handover
    from bnfree_jax.distill.tandem import tandem_roles, tandem_variables

    names = ctx.nets.layer_names
    plan = build_stage_plan(ctx.config.ptl, names)
    assert [needs_handover(plan, k) for k in range(len(plan))] == [False, False] + [True] * (len(names) - 1) + [False]
    stage1 = dataclasses.replace(plan[1], steps=4)
    trees = initial_trees(env, qat_vars, "fold")
    loss = stage_loss(env, stage1, ctx.nets.network(STUDENT), ctx.nets.network(TEACHER))
    trees, _, _ = run_stage(env, stage1, trees, loss, ctx.config.ptl.optim, ctx.workdir / "ck_handover")
    n2 = names[1]
    assert not np.array_equal(np.asarray(trees.T[n2]["kernel"]), np.asarray(qat_vars["params"][n2]["kernel"]))
    batches = lambda: closing(ctx.feed.train_batches(32, stream_seed(env.seed, "test/handover"), ctx.rt.mesh))
    with batches() as it:
        new, rel = hand_over(ctx.nets, plan[2], trees, refit=True, batches=it, num_batches=2)
    spec = ctx.nets.specs(True)[1]
    folded = fold_layer(spec, trees.T[n2], trees.Tbs[n2], None, ctx.nets.per_channel)
    np.testing.assert_array_equal(np.asarray(new.S[n2]["kernel"]), folded["kernel"])
    # numpy least squares of T'_2(h) on S_2's raw op output over the same images
    with batches() as it:
        images = np.concatenate([next(it)["image"] for _ in range(2)])
    L = len(names)
    net2, net1 = ctx.nets.network(tandem_roles(L, 2)), ctx.nets.network(tandem_roles(L, 1))
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
    from bnfree_jax.train.variables import load_variables

    names = ctx.nets.layer_names  # tiny_cnn: conv1, conv2, fc3
    env = _with_ptl(ctx, local_init_steps=2, stage_steps=3, finetune_steps=0)
    cfg = env.ptl
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
    out_dir = ctx.workdir / "head_test"
    student, records = run_plan(env, qat_vars, plan, records=ledger, out_dir=out_dir,
                                ckpt_dir=ctx.workdir / "checkpoints" / "head_test", variant="head_test")
    run_residuals = records[-1]["metrics"]["handover_rel_residual"]
    assert set(run_residuals) == {"conv2", "fc3"}
    # redo the stage's hand-overs from the saved stage-1 trees, with the same batches (the
    # stage's own fit stream): the residuals are the run's own
    init = initial_trees(env, qat_vars, "fold")
    saved = load_variables(out_dir / "stage1_conv1", {"S": init.S, "T": init.T})
    trees = dataclasses.replace(init, S=saved["S"], T=saved["T"])
    with closing(env.feed.train_batches(cfg.batch, stream_seed(env.seed, f"stage/{head.name}/fit"),
                                        env.rt.mesh)) as batches:
        handed, residuals = hand_over_all(env.nets, head, trees, refit=True, batches=batches)
    assert residuals == pytest.approx(run_residuals, rel=1e-5)
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
    assert all(np.array_equal(a, b) for a, b in zip(leaves(saved["S"]["conv1"]), leaves(student["conv1"])))
    for n in ("conv2", "fc3"):  # both head layers trained after their hand-over
        assert not np.array_equal(np.asarray(handed.S[n]["kernel"]), np.asarray(student[n]["kernel"])), n
        assert not np.array_equal(np.asarray(handed.S[n]["kernel"]), np.asarray(init.S[n]["kernel"])), n


def test_block_plan_converts_layers_together_at_the_same_budget(ctx):
    """ptl.block_layers=2 on conv1, conv2, fc3: one stage converts conv1-conv2 (their T'
    path is the target, fc3's T' compensates), then fc3 alone; the total budget is the
    default plan's; a block with the own-activation lever, or of no layers, is refused."""
    from bnfree_jax.distill.plan import total_steps

    names = ctx.nets.layer_names
    cfg = _with_ptl(ctx, stage_steps=3).ptl
    single = build_stage_plan(cfg, names)
    cfg.block_layers = 2
    plan = build_stage_plan(cfg, names)
    assert [s.name for s in plan] == ["local_init", "stage1_conv1-conv2", "stage3_fc3", "finetune"]
    assert total_steps(plan) == total_steps(single) and plan[1].steps == 6 and plan[2].steps == 3
    block = plan[1]
    assert block.block and block.block_first == 1 and list(block.converts) == [1, 2] and block.layer_name == "conv2"
    assert sorted(block.groups(SLOW)) == ["S:conv1", "S:conv2"]  # own_layer_rate="slow" for each converted layer
    assert sorted(block.groups(FROZEN)) == ["T:conv1", "T:conv2"] and block.groups(TRAINABLE) == ["T:fc3"]
    assert not plan[2].block and plan[2].block_first == 3
    for bad, match in ((dict(block_layers=0), "block_layers"),
                       (dict(block_layers=2, train_own_activation=True), "train_own_activation")):
        wrong = cfg.copy_and_resolve_references()
        for k, v in bad.items():
            setattr(wrong, k, v)
        with pytest.raises(ValueError, match=match):
            build_stage_plan(wrong, names)


def test_block_loss_is_the_block_output_against_the_tprime_path(ctx, env, qat_vars):
    """The block stage's layer MSE is S_1..S_2's output against T'_1..T'_2's on the same
    images (numpy), its gradient reaches both converted layers, and fc3's T' learns only
    from the task loss."""
    import jax.numpy as jnp

    from bnfree_jax.distill.stage_runner import split
    from bnfree_jax.distill.tandem import merged

    names = ctx.nets.layer_names
    cfg = _with_ptl(ctx).ptl
    cfg.block_layers = 2
    env2 = dataclasses.replace(env, ptl=cfg)
    block = build_stage_plan(cfg, names)[1]
    student_net, teacher_net = ctx.nets.network(STUDENT), ctx.nets.network(TEACHER)
    trees = initial_trees(env2, qat_vars, "fold")
    params, frozen, _ = split(block, trees)
    loss_fn = stage_loss(env2, block, student_net, teacher_net)
    images, labels = ctx.feed.eval_arrays(64)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    (_, (_, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {}, frozen, batch, None)
    S, T = merged(params, frozen, "S"), merged(params, frozen, "T")
    _, s_trace = student_net.apply({"params": S}, batch["image"], stop=2, capture=True)
    _, t_trace = teacher_net.apply({"params": T, "batch_stats": frozen["Tbs"]}, batch["image"], stop=2, capture=True)
    pred, goal = np.asarray(s_trace[1][1], np.float64), np.asarray(t_trace[1][1], np.float64)
    want = np.mean((pred - goal) ** 2) / (np.var(goal) + 1e-8)
    assert float(metrics["layer_mse"]) == pytest.approx(want, rel=1e-4)
    for n in ("conv1", "conv2"):
        assert float(np.abs(np.asarray(grads["S"][n]["kernel"])).max()) > 0, n
    no_task = {k: (0.0 if k in ("ce", "kd") else v) for k, v in block.losses.items()}
    loss_mse = stage_loss(env2, dataclasses.replace(block, losses=no_task), student_net, teacher_net)
    g = jax.grad(lambda p: loss_mse(p, {}, frozen, batch, None)[0])(params)
    assert float(np.abs(np.asarray(g["T"]["fc3"]["kernel"])).max()) == 0.0  # fc3's T' sees the task loss only
    assert float(np.abs(np.asarray(grads["T"]["fc3"]["kernel"])).max()) > 0


def test_residual_budget_shares_the_tandem_steps_by_residual():
    """ptl.stage_budget="residual": each tandem stage keeps a quarter of its equal budget
    and the rest goes by the residuals of the layers it converts (largest remainders);
    the total and the other stages are unchanged."""
    from bnfree_jax.distill.plan import allocate_by_residual, total_steps

    cfg = load_config("configs/mnist_alexnet.py:quick", ["model.name='tiny_cnn'", "ptl.stage_steps=40",
                                                         "ptl.local_init_steps=7", "ptl.finetune_steps=9"]).ptl
    names = ["conv1", "conv2", "fc3"]
    plan = build_stage_plan(cfg, names)
    out = allocate_by_residual(plan, {"conv1": 0.1, "conv2": 0.3, "fc3": 0.6})
    # 120 tandem steps: 10 each kept, 90 shared 9 : 27 : 54
    assert [s.steps for s in out] == [7, 19, 37, 64, 9]
    assert total_steps(out) == total_steps(plan)
    assert [dataclasses.replace(s, steps=0) for s in out] == [dataclasses.replace(s, steps=0) for s in plan]
    even = allocate_by_residual(plan, {"conv1": 2.0, "conv2": 2.0, "fc3": 2.0})
    assert [s.steps for s in even] == [s.steps for s in plan]
    cfg.stage_steps = 41  # 123 tandem steps, 10 kept each, 93 shared 1 : 1 : 2 → 23.25, 23.25, 46.5
    odd = allocate_by_residual(build_stage_plan(cfg, names), {"conv1": 1.0, "conv2": 1.0, "fc3": 2.0})
    assert [s.steps for s in odd if s.kind == "tandem"] == [33, 33, 57]  # the .5 remainder wins the step
    cfg.stage_steps, cfg.block_layers = 40, 2  # a block's weight is the sum of its layers'
    block = allocate_by_residual(build_stage_plan(cfg, names), {"conv1": 0.1, "conv2": 0.3, "fc3": 0.6})
    assert [s.steps for s in block if s.kind == "tandem"] == [20 + 36, 10 + 54]  # 90 shared 0.4 : 0.6
    with pytest.raises(ValueError, match="no residual for layer"):
        allocate_by_residual(plan, {"conv1": 0.1})


def test_residual_budget_run_records_and_trains_the_shared_steps(ctx, qat_vars, monkeypatch):
    """A run with stage_budget="residual" measures each layer's least-squares residual on
    its initial trees (its own stream), records it, trains each stage for its share, and
    a rerun reads the record instead of measuring again."""
    from bnfree_jax.distill.least_squares import least_squares_init
    from bnfree_jax.distill.plan import allocate_by_residual, total_steps

    names = ctx.nets.layer_names
    env = _with_ptl(ctx, local_init_steps=2, stage_steps=4, finetune_steps=0, stage_budget="residual")
    plan = build_stage_plan(env.ptl, names)
    ledger = Ledger(ctx.workdir)
    out_dir, ckpt_dir = ctx.workdir / "budget_test", ctx.workdir / "checkpoints" / "budget_test"
    _, records = run_plan(env, qat_vars, plan, records=ledger, out_dir=out_dir, ckpt_dir=ckpt_dir,
                          variant="budget_test")
    init = initial_trees(env, qat_vars, "fold")
    with closing(env.feed.train_batches(env.ptl.batch, stream_seed(env.seed, "budget_test/budget"),
                                        env.rt.mesh)) as batches:
        _, residuals = least_squares_init(ctx.nets.network(STUDENT), init.S, ctx.nets.network(TEACHER),
                                          init.teacher, batches)
    recorded = ledger.get("budget_test/budget")
    assert recorded["residuals"] == pytest.approx(residuals, rel=1e-5)
    expected = allocate_by_residual(plan, residuals)
    assert [r["steps"] for r in records] == [s.steps for s in expected]
    assert recorded["steps"] == {s.name: s.steps for s in expected}
    assert sum(r["steps"] for r in records) == total_steps(plan)
    assert [r["steps"] for r in records] != [s.steps for s in plan]  # the residuals differ: so do the shares
    def measured_again(*args, **kwargs):
        raise AssertionError("the rerun measured the residuals again")

    monkeypatch.setattr("bnfree_jax.distill.ptl.least_squares_init", measured_again)
    _, rerun = run_plan(env, qat_vars, plan, records=ledger, out_dir=out_dir, ckpt_dir=ckpt_dir,
                        variant="budget_test")
    assert [r["steps"] for r in rerun] == [s.steps for s in expected]
