"""`model.act_init` as a calibrator name: the QAT teacher's clips at the start of QAT and
the scratch student's at its initialisation come from calibration on training images,
layer by layer (each on the output of the layers before it, quantized with their
calibrated clips), recomputed here independently with one max over all sample images."""

import json

import numpy as np
import pytest

from job_helpers import CONFIG, TINY, bnfree

CALIBRATED = [*TINY, "model.act_init=minmax"]


def _context(wd, overrides=CALIBRATED):
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.pipeline.validate import load_valid_config

    return make_context(load_valid_config(CONFIG, overrides), wd, log=lambda m: None)


def _sample_images(ctx, stream: str):
    """The ACT_INIT_IMAGES training images the stream's seed draws (data.sample_indices)."""
    from bnfree_jax.train.clip_calibration import ACT_INIT_IMAGES
    from bnfree_jax.train.streams import stream_seed

    train = ctx.feed.train_source
    idx = np.sort(np.random.default_rng(stream_seed(ctx.config.seed, stream))
                  .choice(len(train), min(ACT_INIT_IMAGES, len(train)), replace=False))
    return np.stack([train[int(i)]["image"] for i in idx])


def _sequential_maxima(net, variables, images) -> dict:
    """{layer: max of its pooled ReLU input}, each layer run with the maxima found before it
    (a BN network normalising by the statistics of the images, as its training steps do)."""
    import flax.linen as nn

    params = {k: dict(v) for k, v in variables["params"].items()}
    out = {}
    for i, spec in enumerate(net.specs):
        if "act_alpha" not in params.get(spec.name, {}):
            continue
        v = {**variables, "params": params}
        if "batch_stats" in variables:
            (_, trace), _ = net.apply(v, images, train=True, stop=i + 1, capture=True, mutable=["batch_stats"])
        else:
            _, trace = net.apply(v, images, stop=i + 1, capture=True)
        a = np.maximum(np.asarray(trace[-1][1]), 0)
        if spec.pool:
            a = np.asarray(nn.max_pool(a, (spec.pool,) * 2, strides=(spec.pool,) * 2))
        out[spec.name] = float(a.max())
        params[spec.name]["act_alpha"] = np.float32(out[spec.name])
    return out


@pytest.mark.parametrize("value, expected", [("mse", "mse"), ("entropy", "entropy"), ("3", 3.0), ("2.5", 2.5)])
def test_act_init_takes_a_calibrator_name_or_a_number(value, expected):
    from bnfree_jax.pipeline.validate import load_valid_config

    c = load_valid_config(CONFIG, [*TINY, f"model.act_init={value}"])
    assert c.model.act_init == expected and type(c.model.act_init) is type(expected)


@pytest.mark.parametrize("value", ["histogram", "0", "-1.0", "True"])
def test_a_bad_act_init_is_one_line_and_runs_nothing(value, tmp_path):
    wd = tmp_path / "wd"
    p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(wd), *TINY, f"model.act_init={value}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "model.act_init" in p.stderr
    assert not wd.exists()


@pytest.fixture(scope="module")
def qat_wd(tmp_path_factory):
    """`bnfree train-teacher --qat` with model.act_init=minmax."""
    wd = tmp_path_factory.mktemp("act_init") / "wd"
    p = bnfree("train-teacher", "--qat", "--config", CONFIG, "--workdir", str(wd), *CALIBRATED)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "activation clips by minmax calibration" in p.stderr
    return wd


def test_qat_clips_start_from_the_calibration_of_the_float_teacher(qat_wd):
    from bnfree_jax.nn.network import TEACHER
    from bnfree_jax.pipeline.ledger import Ledger
    from bnfree_jax.pipeline.teacher import run_teacher_phases
    from bnfree_jax.train.streams import stream_key
    from bnfree_jax.train.supervised import graft, init_variables

    record = json.loads((qat_wd / "phases.json").read_text())["qat"]["act_init"]
    assert record["method"] == "minmax" and record["images"] == 256
    ctx = _context(qat_wd)
    float_vars, _ = run_teacher_phases(ctx, Ledger(qat_wd), qat=False)
    net = ctx.nets.network(TEACHER, quantized=True)
    start = graft(init_variables(net, ctx.nets.image_shape, stream_key(ctx.config.seed, "qat/init")), float_vars)
    expected = _sequential_maxima(net, start, _sample_images(ctx, "qat/act_init"))
    assert sorted(record["act_alpha"]) == sorted(expected) == ["conv1", "conv2"]
    for name, alpha in expected.items():
        assert record["act_alpha"][name] == pytest.approx(alpha, rel=1e-6)
        assert alpha != pytest.approx(4.0)  # not the constant


def test_a_constant_act_init_calibrates_nothing(qat_wd):
    """The default (a number) keeps every clip at it: no calibration record, no log line."""
    from bnfree_jax.nn.network import TEACHER
    from bnfree_jax.pipeline.teacher import calibrated_start

    ctx = _context(qat_wd, [*TINY, "model.act_init=3.0"])
    assert ctx.nets.act_calibration is None and ctx.nets.act_init == 3.0
    variables = {"params": {"conv1": {"act_alpha": np.float32(3.0)}}}
    assert calibrated_start(ctx, ctx.nets.network(TEACHER), variables, "qat") == (variables, None)


def test_the_scratch_student_starts_with_calibrated_clips(qat_wd):
    from bnfree_jax.distill.ptl import initial_trees
    from bnfree_jax.nn.network import STUDENT
    from bnfree_jax.pipeline.ledger import Ledger
    from bnfree_jax.pipeline.teacher import run_teacher_phases
    from bnfree_jax.train.streams import stream_key
    from bnfree_jax.train.supervised import init_variables

    ctx = _context(qat_wd)
    _, qat_vars = run_teacher_phases(ctx, Ledger(qat_wd))
    S = initial_trees(ctx.env, qat_vars, "scratch").S
    net = ctx.nets.network(STUDENT)
    fresh = init_variables(net, ctx.nets.image_shape, stream_key(ctx.config.seed, "student/init"))
    expected = _sequential_maxima(net, fresh, _sample_images(ctx, "student/act_init"))
    for name, alpha in expected.items():
        assert float(S[name]["act_alpha"]) == pytest.approx(alpha, rel=1e-6)
    assert float(S["conv1"]["kernel"].sum()) == pytest.approx(float(fresh["params"]["conv1"]["kernel"].sum()))
