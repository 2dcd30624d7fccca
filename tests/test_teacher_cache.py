"""The teacher cache: batches carry example ids, the cache equals the teacher's own outputs,
stage losses read it without running the teacher, and iterator positions pass through."""

import dataclasses
from contextlib import closing

import numpy as np
import pytest

from bnfree_jax.config_io import load_config
from bnfree_jax.distill.plan import build_stage_plan
from bnfree_jax.distill.ptl import initial_trees, plan_teacher_cache, stage_loss
from bnfree_jax.distill.stage_runner import split
from bnfree_jax.distill.teacher_cache import CachedBatches, build_teacher_cache, cached_layers
from bnfree_jax.nn.network import STUDENT, TEACHER
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.train.streams import stream_key, stream_seed
from bnfree_jax.train.supervised import init_variables

TINY = ["model.name='tiny_cnn'", "data.max_train_examples=96", "data.max_test_examples=32",
        "ptl.batch=16", "teacher.batch=16", "qat.batch=16", "data.eval_batch=32",
        "ptl.layer_target='teacher'"]  # the mode whose layer targets come from the cache


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    config = load_config("configs/mnist_alexnet.py:quick", TINY)
    return make_context(config, tmp_path_factory.mktemp("cache"), log=lambda m: None)


@pytest.fixture(scope="module")
def qat_vars(ctx):
    v = init_variables(ctx.nets.network(TEACHER), ctx.nets.image_shape, stream_key(ctx.env.seed, "qat/init"))
    rng = np.random.default_rng(0)
    for bs in v["batch_stats"].values():
        bs["bn"]["mean"] = rng.normal(0, 0.3, bs["bn"]["mean"].shape).astype(np.float32)
        bs["bn"]["var"] = rng.uniform(0.5, 2.0, bs["bn"]["var"].shape).astype(np.float32)
    return v


@pytest.fixture(scope="module")
def cache(ctx, qat_vars):
    return build_teacher_cache(ctx.nets.network(TEACHER), qat_vars, ctx.feed.train_source, budget_mb=1e6,
                               batch_size=40)


def batches(ctx, name: str):
    """A training iterator of the job's feed on the test's own stream `name`."""
    return ctx.feed.train_batches(16, stream_seed(ctx.env.seed, name), ctx.rt.mesh)


def test_batches_carry_the_ids_of_their_examples(ctx):
    source = ctx.feed.train_source
    with closing(batches(ctx, "test/ids")) as it:
        for _ in range(7):  # past one epoch of 96 examples
            b = next(it)
            expect = np.stack([source[int(i)]["image"] for i in b["index"]])
            assert np.array_equal(b["image"], expect)
            assert np.array_equal(b["label"], [source[int(i)]["label"] for i in b["index"]])


def test_cache_equals_the_teacher_on_each_example(ctx, qat_vars, cache):
    net = ctx.nets.network(TEACHER)
    ids = np.array([0, 5, 50, 95])
    images = np.stack([ctx.feed.train_source[int(i)]["image"] for i in ids])
    logits, trace = net.apply(qat_vars, images, train=False, capture=True)
    rows = cache.rows(ids)
    np.testing.assert_allclose(cache.logits[rows], logits, rtol=1e-5, atol=1e-5)
    assert sorted(cache.targets) == list(range(1, len(net.specs) + 1))
    for l, t in cache.targets.items():
        np.testing.assert_allclose(t[rows], trace[l - 1][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
        cache.rows(np.array([96]))


def test_cached_layers_fill_the_budget_from_the_last_layer_back():
    shapes = [(8, 8, 4), (4, 4, 8), (16,), (10,)]  # 1 KiB, 512 B, 64 B, 40 B per example (float32)
    n = 1024
    mb = lambda nbytes: nbytes / 2 ** 20
    assert cached_layers(shapes, n, 0) == []
    assert cached_layers(shapes, n, mb(n * 104)) == [3, 4]
    assert cached_layers(shapes, n, mb(n * 104) - 1e-6) == [4]
    assert cached_layers(shapes, n, mb(n * (104 + 512 + 1024))) == [1, 2, 3, 4]
    assert cached_layers(shapes, n, mb(n * (104 + 512 + 1023))) == [2, 3, 4]


def _losses_with_and_without_cache(ctx, qat_vars, cache, stage, layer, drop_teacher=None):
    trees = initial_trees(ctx.env, qat_vars, "fold")
    params, frozen, _ = split(stage, trees)
    loss_fn = stage_loss(ctx.env, stage, ctx.nets.network(STUDENT), ctx.nets.network(TEACHER))
    with closing(batches(ctx, "test/loss")) as it:
        plain = next(it)
    batch = next(CachedBatches(iter([plain]), cache, layer))
    rng = stream_key(ctx.env.seed, "test/loss")
    ref, _ = loss_fn(params, {}, frozen, plain, rng)
    cached_frozen = dict(frozen)
    if drop_teacher == "all":
        del cached_frozen["teacher"]  # the step must not need the teacher at all
    elif drop_teacher is not None:  # the teacher beyond layer ℓ must not be needed
        keep = ctx.nets.layer_names[:drop_teacher]
        t = frozen["teacher"]
        cached_frozen["teacher"] = {"params": {k: t["params"][k] for k in keep},
                                    "batch_stats": {k: v for k, v in t["batch_stats"].items() if k in keep}}
    got, _ = loss_fn(params, {}, cached_frozen, batch, rng)
    return float(ref), float(got), batch


@pytest.mark.parametrize("which", [2, "last", "finetune"])
def test_cached_targets_give_the_same_loss_without_the_teacher(ctx, qat_vars, cache, which):
    names = ctx.nets.layer_names
    plan = build_stage_plan(ctx.config.ptl, names)
    stage = {2: plan[2], "last": plan[len(names)], "finetune": plan[-1]}[which]
    ref, got, batch = _losses_with_and_without_cache(ctx, qat_vars, cache, stage, stage.layer, drop_teacher="all")
    assert ("t_target" in batch) == (stage.kind == "tandem")
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_with_only_logits_cached_the_teacher_runs_up_to_layer_l(ctx, qat_vars):
    logits_only = build_teacher_cache(ctx.nets.network(TEACHER), qat_vars, ctx.feed.train_source, budget_mb=0)
    assert logits_only.targets == {}
    stage = build_stage_plan(ctx.config.ptl, ctx.nets.layer_names)[2]  # ℓ = 2
    ref, got, batch = _losses_with_and_without_cache(ctx, qat_vars, logits_only, stage, 2, drop_teacher=2)
    assert "t_target" not in batch and "t_logits" in batch
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_cached_batches_keep_the_iterator_position(ctx, cache):
    wrapped = CachedBatches(batches(ctx, "test/position"), cache, layer=1)
    next(wrapped)
    state = wrapped.get_state()
    expect = [next(wrapped)["index"] for _ in range(3)]
    other = CachedBatches(batches(ctx, "test/position"), cache, layer=1)
    other.set_state(state)
    got = [next(other) for _ in range(3)]
    assert all(np.array_equal(e, g["index"]) for e, g in zip(expect, got))
    np.testing.assert_array_equal(got[0]["t_target"], cache.targets[1][cache.rows(got[0]["index"])])
    wrapped.close()
    other.close()


def test_plan_teacher_cache_follows_the_config(ctx, qat_vars, cache):
    """The plan's cache is the teacher's outputs over the job's training split (layer targets
    only for 'teacher' layer targets); none when inputs are augmented or caching is off."""
    env = ctx.env
    planned = plan_teacher_cache(env, qat_vars)
    np.testing.assert_array_equal(planned.ids, cache.ids)
    np.testing.assert_allclose(planned.logits, cache.logits, rtol=1e-5, atol=1e-5)
    assert sorted(planned.targets) == sorted(cache.targets)  # the 2048 MiB default holds them all
    for l in cache.targets:
        np.testing.assert_allclose(planned.targets[l], cache.targets[l], rtol=1e-5, atol=1e-5)
    tandem = env.ptl.copy_and_resolve_references()
    tandem.layer_target = "tandem"  # targets come from T', not the teacher: logits only
    assert plan_teacher_cache(dataclasses.replace(env, ptl=tandem), qat_vars).targets == {}
    off = env.ptl.copy_and_resolve_references()
    off.cache_teacher = False
    assert plan_teacher_cache(dataclasses.replace(env, ptl=off), qat_vars) is None
    augmented = dataclasses.replace(env, feed=dataclasses.replace(env.feed, augment="crop_flip"))
    assert plan_teacher_cache(augmented, qat_vars) is None
