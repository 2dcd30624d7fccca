"""Models: one definition for teacher and student, built for a job by one factory; folding BN
is exact per channel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax.distill.fold import fold_student
from bnfree_jax.nn.factory import NetFactory
from bnfree_jax.nn.network import STUDENT, TEACHER, make_network
from bnfree_jax.nn.zoo import get_layer_specs, with_bits, alexnet_mini

MEAN, STD = [0.1307], [0.3081]


def _images(n=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))


def _trained_like_teacher(specs, requant, seed=0):
    """A teacher with non-trivial BN statistics and affine parameters."""
    net = make_network(specs, TEACHER, MEAN, STD, requant=requant)
    v = jax.device_get(net.init(jax.random.key(seed), _images(1)))
    rng = np.random.default_rng(seed)
    for name, bs in v["batch_stats"].items():
        n = bs["bn"]["mean"].shape[0]
        bs["bn"]["mean"] = rng.normal(0, 0.3, n).astype(np.float32)
        bs["bn"]["var"] = rng.uniform(0.5, 2.0, n).astype(np.float32)
        v["params"][name]["bn"]["scale"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        v["params"][name]["bn"]["bias"] = rng.normal(0, 0.2, n).astype(np.float32)
    return net, v


def test_layer_names_and_bits():
    specs = get_layer_specs("alexnet_mini", 10, 4, 4)
    assert [s.name for s in specs] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert [s.w_bits for s in specs] == [8, 4, 4, 4, 4, 4, 4, 8]
    assert specs[-1].last and all(s.a_bits == 4 for s in specs[:-1])
    with pytest.raises(ValueError, match="outside 1..8"):
        with_bits(alexnet_mini(), 9, 4)


def test_student_has_no_batchnorm_and_no_batch_statistics():
    specs = get_layer_specs("alexnet_mini", 10, 4, 4)
    net = make_network(specs, STUDENT, MEAN, STD)
    v = net.init(jax.random.key(0), _images(1))
    assert set(v) == {"params"}
    flat = jax.tree_util.tree_flatten_with_path(v)[0]
    assert not any("bn" in jax.tree_util.keystr(p) or "batch_stats" in jax.tree_util.keystr(p) for p, _ in flat)
    # a student forward in "train" mode uses no batch statistics: one example's output
    # does not depend on the rest of the batch
    x = _images(8)
    full = net.apply(v, x, train=True)
    single = net.apply(v, x[:1], train=True)
    np.testing.assert_allclose(np.asarray(full[:1]), np.asarray(single), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [(4, 4), (1, 1), (8, 8)])
def test_fold_is_exact_per_channel(bits):
    """requant='channel': BN's k moves into the per-channel α, so student == teacher."""
    specs = get_layer_specs("alexnet_mini", 10, *bits)
    t_net, t_vars = _trained_like_teacher(specs, "channel")
    s_net = make_network(specs, STUDENT, MEAN, STD, requant="channel")
    s_params = fold_student(s_net, t_vars)
    x = _images(16)
    t_logits, t_trace = t_net.apply(t_vars, x, capture=True)
    s_logits, s_trace = s_net.apply({"params": s_params}, x, capture=True)
    for (ta, tp), (sa, sp), spec in zip(t_trace, s_trace, specs):
        np.testing.assert_allclose(np.asarray(sp), np.asarray(tp), rtol=1e-3, atol=1e-3, err_msg=spec.name)
    agree = np.mean(np.argmax(np.asarray(s_logits), -1) == np.argmax(np.asarray(t_logits), -1))
    assert agree == 1.0


def test_fold_per_layer_is_lossy_but_close():
    """requant='layer': one α per layer, BN's k re-rounded in the weights — small, nonzero error."""
    specs = get_layer_specs("alexnet_mini", 10, 4, 4)
    t_net, t_vars = _trained_like_teacher(specs, "layer")
    s_net = make_network(specs, STUDENT, MEAN, STD, requant="layer")
    s_params = fold_student(s_net, t_vars)
    x = _images(16)
    _, t_trace = t_net.apply(t_vars, x, capture=True)
    first_s = s_net.apply({"params": s_params}, x, stop=1, capture=True)[1][0][1]
    err = float(jnp.mean((first_s - t_trace[0][1]) ** 2) / jnp.var(t_trace[0][1]))
    assert 0.0 < err < 0.2


def test_factory_builds_every_network_of_the_job_from_one_place():
    """NetFactory: the job's float/quantised specs, normalisation and requant mode, so a
    network it builds is the one make_network builds from the same parts."""
    float_specs, quant_specs = get_layer_specs("alexnet_mini", 10), get_layer_specs("alexnet_mini", 10, 2, 2)
    nets = NetFactory(float_specs=tuple(float_specs), quant_specs=tuple(quant_specs), mean=tuple(MEAN),
                      std=tuple(STD), image_shape=(28, 28, 1), requant="channel", act_init=3.0)
    assert nets.layer_names == [s.name for s in quant_specs] and nets.per_channel
    assert nets.specs(True) == tuple(quant_specs) and nets.specs(False) == tuple(float_specs)
    assert not dataclasses.replace(nets, requant="layer").per_channel
    roles = (STUDENT, STUDENT) + (TEACHER,) * (len(quant_specs) - 2)
    for got, want in (
            (nets.network(roles), make_network(quant_specs, roles, MEAN, STD, requant="channel", act_init=3.0)),
            (nets.network(TEACHER, quantized=False, bn_axis_name="data"),
             make_network(float_specs, TEACHER, MEAN, STD, requant="channel", bn_axis_name="data", act_init=3.0))):
        assert got.specs == want.specs and got.roles == want.roles and got.bn_axis_name == want.bn_axis_name
        x = _images(4)
        v = jax.device_get(want.init(jax.random.key(1), x[:1]))
        np.testing.assert_array_equal(np.asarray(got.apply(v, x)), np.asarray(want.apply(v, x)))
    mixed = nets.network(roles)
    assert mixed.zero_point == make_network(quant_specs, STUDENT, MEAN, STD).zero_point
    assert mixed.inv_std == (1.0 / STD[0],) and mixed.act_init == 3.0
