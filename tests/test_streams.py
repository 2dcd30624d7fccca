"""The job's random streams (`train.streams`): one root key per job, every stream a
`fold_in` of a stable id of its name. Streams of different names or root seeds never
coincide (the old stage data seed `2·seed + 1000 + k` made seed 1's stage k read seed 0's
stage k + 2), a stream is the same in every call and process, and every key is typed."""

import hashlib
import itertools
import pathlib
from contextlib import closing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax.config_io import load_config
from bnfree_jax.distill.plan import build_stage_plan
from bnfree_jax.distill.stage_runner import Trees, stage_state
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.train.streams import stream_key, stream_seed

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bnfree_jax"
TINY = ["data.max_train_examples=256", "data.max_test_examples=64", "ptl.batch=16", "teacher.batch=16",
        "qat.batch=16", "data.eval_batch=64"]  # the default model (alexnet_mini): its real plan


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    config = load_config("configs/mnist_alexnet.py", TINY)
    return make_context(config, tmp_path_factory.mktemp("streams"), log=lambda m: None)


@pytest.fixture(scope="module")
def plan(ctx):
    return build_stage_plan(ctx.config.ptl, ctx.nets.layer_names)


def stream_names(plan) -> list[str]:
    """Every stream a job draws from (docs/architecture.md), for the stages of `plan`."""
    fixed = [f"{phase}/{use}" for phase in ("teacher", "qat") for use in ("init", "data", "step")]
    return fixed + ["student/init"] + [f"stage/{s.name}/{use}" for s in plan for use in ("data", "fit", "step")]


def raw(key) -> tuple:
    return tuple(int(v) for v in np.asarray(jax.random.key_data(key)).ravel())


def is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def test_the_plan_is_the_configs(plan, ctx):
    names = ctx.nets.layer_names
    assert len(names) == 8  # alexnet_mini
    assert [s.name for s in plan] == ["local_init"] + [f"stage{l}_{n}" for l, n in enumerate(names, 1)] + ["finetune"]


def test_streams_of_different_names_or_seeds_differ(plan):
    names = stream_names(plan)
    assert len(set(names)) == len(names) == 7 + 3 * len(plan)
    pairs = list(itertools.product((0, 1, 2, 7), names))
    keys = {raw(stream_key(seed, name)) for seed, name in pairs}
    seeds = {stream_seed(seed, name) for seed, name in pairs}
    assert len(keys) == len(pairs)  # no two (root seed, name) share a key
    assert len(seeds) == len(pairs)  # nor an integer seed


def test_seed_one_no_longer_reads_seed_zeros_stages_two_later(plan):
    """The old stage data seed, `config.seed + (config.seed + 1000 + k)`, gave seed 1 at
    stage k the data order of seed 0 at stage k + 2; the named streams do not."""
    old = lambda seed, k: 2 * seed + 1000 + k
    assert len(plan) >= 3
    for k in range(len(plan) - 2):
        assert old(1, k) == old(0, k + 2)  # the defect, as it was
        a, b = f"stage/{plan[k].name}/data", f"stage/{plan[k + 2].name}/data"
        assert stream_seed(1, a) != stream_seed(0, b), (plan[k].name, plan[k + 2].name)
        assert raw(stream_key(1, a)) != raw(stream_key(0, b))
        # nor one stage's order another stage's of the same seed, nor its own of the other seed
        assert stream_seed(0, a) != stream_seed(0, b) and stream_seed(0, a) != stream_seed(1, a)


def test_streams_are_stable_and_their_seeds_31_bit(plan):
    for name in stream_names(plan)[:12]:
        for seed in (0, 3):
            key = stream_key(seed, name)
            assert raw(key) == raw(stream_key(seed, name))  # the same in every call
            s = stream_seed(seed, name)
            assert type(s) is int and 0 <= s < 2 ** 31 and s == stream_seed(seed, name)
            # an independent derivation: fold_in of the root key with the first four bytes of the
            # name's sha256 (little endian, 31 bits); the int seed is the key's last word, 31 bits
            name_id = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFFFFFF
            expect = jax.random.fold_in(jax.random.key(seed), name_id)
            assert raw(key) == raw(expect)
            assert s == raw(expect)[-1] & 0x7FFFFFFF
    # Pinned values: the same in every process (sha256, not Python's salted hash), and they
    # change only when a stream is renamed; a change here changes every job's draws.
    assert stream_seed(0, "teacher/init") == 604993640
    assert stream_seed(0, "student/init") == 995186932
    assert stream_seed(0, "stage/stage1_conv1/data") == 1457537920
    assert stream_seed(1, "stage/stage1_conv1/data") == 1666680
    assert raw(stream_key(0, "teacher/init")) == (435430653, 2752477288)


def first_batch(ctx, seed: int) -> dict:
    with closing(ctx.feed.train_batches(16, seed, ctx.rt.mesh)) as it:
        return next(it)


def test_training_iterators_follow_their_streams(ctx, plan):
    """Two stages' training data orders differ; the same stream read twice is the same batch."""
    data = lambda seed, k: stream_seed(seed, f"stage/{plan[k].name}/data")
    one, again = first_batch(ctx, data(0, 1)), first_batch(ctx, data(0, 1))
    two = first_batch(ctx, data(0, 2))
    for key in ("index", "image", "label"):
        np.testing.assert_array_equal(one[key], again[key])
    assert not np.array_equal(one["index"], two["index"])
    assert not np.array_equal(one["image"], two["image"])
    # the old collision, on the actual iterators: seed 1 stage 1 vs seed 0 stage 3
    assert not np.array_equal(first_batch(ctx, data(1, 1))["index"], first_batch(ctx, data(0, 3))["index"])


def test_stream_keys_are_typed():
    key = stream_key(0, "teacher/init")
    assert is_typed_key(key) and key.shape == ()
    assert str(jax.random.key_impl(key)) == str(jax.random.key_impl(jax.random.key(0)))
    assert not is_typed_key(jax.random.PRNGKey(0))  # what a legacy uint32 key would look like


def test_a_stages_state_draws_its_step_stream_with_a_typed_key(ctx, plan):
    names = ctx.nets.layer_names
    leaf = lambda: {"kernel": np.zeros((2, 2), np.float32)}
    trees = Trees(S={n: leaf() for n in names}, T={n: leaf() for n in names}, Tbs={}, teacher={})
    for stage in (plan[0], plan[3], plan[-1]):
        for seed in (0, 1):
            state, _, _ = stage_state(stage, trees, ctx.config.ptl.optim, seed)
            assert is_typed_key(state.rng), stage.name
            assert raw(state.rng) == raw(stream_key(seed, f"stage/{stage.name}/step"))


def test_supervised_training_draws_its_phase_streams_with_a_typed_key(ctx, monkeypatch):
    """train_bn_network's state starts from the phase's step stream (typed), its data from the
    phase's data stream."""
    from bnfree_jax.nn.network import TEACHER
    from bnfree_jax.train import supervised

    seen = {}

    def fake_phase(phase, ckpt_dir, like_state, frozen, loss_fn, tx, batches, steps, rt, start=None, lr=None):
        seen["state"], seen["phase"] = like_state, phase
        return like_state, {}

    class Feed:
        def train_batches(self, global_batch, seed, mesh):
            seen["data_seed"] = seed
            return iter(())

    monkeypatch.setattr(supervised, "train_phase", fake_phase)
    monkeypatch.setattr(supervised, "evaluate_top1", lambda *a, **k: 0.0)
    net = ctx.nets.network(TEACHER, quantized=False)
    init_key = stream_key(5, "teacher/init")
    variables = supervised.init_variables(net, ctx.nets.image_shape, init_key)
    again = supervised.init_variables(net, ctx.nets.image_shape, stream_key(5, "teacher/init"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)))
    supervised.train_bn_network("teacher", net, variables, 3, 16, ctx.config.teacher.optim, rt=ctx.rt,
                                feed=Feed(), ckpt_dir=None, seed=5)
    assert seen["phase"] == "teacher"
    assert is_typed_key(seen["state"].rng)
    assert raw(seen["state"].rng) == raw(stream_key(5, "teacher/step"))
    assert seen["data_seed"] == stream_seed(5, "teacher/data")


def test_no_legacy_prngkey_in_the_package():
    """Every key of the package is a typed `jax.random.key`: no legacy uint32 `PRNGKey` left."""
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "PRNGKey" in line]
    assert hits == []
