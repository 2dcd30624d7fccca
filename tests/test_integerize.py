"""integerize on its own: its integer layers, run by the independent numpy int64 reference
(tests/int_reference.py), against the fake-quant float student it was made from.

The students are random *folded-like* parameter trees (random kernels, α of both signs,
β, act_alpha calibrated so codes spread), at every width W/A in {1, 2, 4, 8}, both
requant granularities, MNIST-like (one channel) and CIFAR-like (three channels) input
normalisation. Each layer gets the same input codes in both worlds, so an error cannot
hide behind the next layer.

Tolerances, in output steps. With r = |α|·s_x·s_w the accumulator step, the integer
bias round(β/r) is off by ≤ r/2, the output rounding by ≤ 1/2, the dyadic multiplier by
a relative 2^-30, float32 by a little: |y − pre/s_out| ≤ 1/2 + r/(2·s_out) + ε. That is
one output step whenever r ≤ s_out (always for the logits, whose step is max r). When the
accumulator is coarser than the output grid (r > s_out, e.g. a binary layer with few taps
and 8-bit outputs) the bias cannot be placed finer than r in this format, and the bound
grows with it. Sign layers are exact: the signs agree wherever |pre| is not within float
noise of 0.
"""

import math
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from int_reference import layer_acc, max_pool, output_stage, reference_run  # noqa: E402

from bnfree_jax.export.artifact import write_artifact  # noqa: E402
from bnfree_jax.export.integerize import dyadic, integerize  # noqa: E402
from bnfree_jax.nn.network import STUDENT, make_network, on_accumulator_grid  # noqa: E402
from bnfree_jax.nn.weights import student_weight  # noqa: E402
from bnfree_jax.nn.zoo import LayerSpec, tiny_cnn, with_bits  # noqa: E402

DATASETS = {
    "mnist": ((0.1307,), (0.3081,), (8, 8, 1)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (8, 8, 3)),
}
WIDTHS = (1, 2, 4, 8)
N_CALIB, N_EVAL = 16, 96
EPS = 2e-3  # float32 noise and the 2^-30 multiplier error, in output steps
REL_EPS = 2e-6  # float32 noise relative to the output's magnitude
SIGN_MARGIN = 1e-3  # sign layers: |pre| below this many accumulator steps is float noise


def chain_specs(bits, last_w_bits) -> list[LayerSpec]:
    """conv(pool 2) → conv → conv(stride 2) → dense logits, `bits` = [(w, a)] per hidden layer."""
    (w1, a1), (w2, a2), (w3, a3) = bits
    return [
        LayerSpec("conv1", "conv", 6, kernel=3, pool=2, w_bits=w1, a_bits=a1),
        LayerSpec("conv2", "conv", 8, kernel=3, w_bits=w2, a_bits=a2),
        LayerSpec("conv3", "conv", 8, kernel=3, stride=2, w_bits=w3, a_bits=a3),
        LayerSpec("fc4", "dense", 10, kernel=1, w_bits=last_w_bits, last=True),
    ]


def _cases():
    """Every W×A pair (all layers at it), both requants and datasets spread over them,
    plus mixed chains (sign → binary layer → multi-bit), a dense first layer (the zero
    point folded along the flattened pixels), and the zoo's tiny_cnn."""
    cases = []
    for iw, w in enumerate(WIDTHS):
        for ia, a in enumerate(WIDTHS):
            requant = ("layer", "channel")[(iw + ia) % 2]
            data = ("mnist", "cifar")[(iw // 2 + ia) % 2]
            cases.append(pytest.param(chain_specs([(w, a)] * 3, w), data, requant, id=f"W{w}A{a}-{data}-{requant}"))
    mixed = chain_specs([(8, 1), (1, 1), (1, 4)], 2)
    cases += [pytest.param(mixed, d, rq, id=f"mixed-{d}-{rq}") for d in DATASETS for rq in ("layer", "channel")]
    # a dense first layer only on one channel: network.Layer's 1/std fold assumes HWIO's I axis
    for (w, a), rq in (((4, 4), "channel"), ((8, 1), "layer")):
        dense_first = [LayerSpec("fc1", "dense", 12, kernel=1, w_bits=w, a_bits=a),
                       LayerSpec("fc2", "dense", 10, kernel=1, w_bits=8, last=True)]
        cases.append(pytest.param(dense_first, "mnist", rq, id=f"dense-first-W{w}A{a}-mnist-{rq}"))
        # three input channels: 1/std and the zero point tiled along the flattened NHWC input
        cases.append(pytest.param(dense_first, "cifar", rq, id=f"dense-first-W{w}A{a}-cifar-{rq}"))
    cases += [pytest.param(with_bits(tiny_cnn(10), 2, 2), "cifar", "channel", id="tiny_cnn-W2A2-cifar-channel"),
              pytest.param(with_bits(tiny_cnn(10), 1, 1, 8), "mnist", "layer", id="tiny_cnn-W1A1-mnist-layer")]
    return cases


def _pool(x: np.ndarray, k: int) -> np.ndarray:
    """Float max-pool, k×k windows, stride k, VALID (the network's and the format's)."""
    if not k:
        return x
    n, h, w, c = x.shape
    return x[:, :h // k * k, :w // k * k].reshape(n, h // k, k, w // k, k, c).max(axis=(2, 4))


def _apply_layer(net, params, x, i):
    """(activation, pre-activation) of layer i of the float student on input x."""
    _, [(act, pre)] = net.apply({"params": params}, x, start=i, stop=i + 1, capture=True)
    return np.asarray(act, np.float64), np.asarray(pre, np.float64)


def folded_like(rng, net, specs, images, per_channel):
    """Random student params, built layer by layer so every layer's outputs spread:
    kernels ~ lecun normal, |α| in [0.5, 2] with a random sign (per channel under
    requant="channel"), β of the size of the pre-activation's spread (sign layers:
    about minus its median, so both signs occur), act_alpha = 95th percentile of ReLU(pre)."""
    params = jax.tree_util.tree_map(np.array, jax.device_get(net.init(jax.random.PRNGKey(0), images[:1])["params"]))
    x = images
    for i, spec in enumerate(specs):
        p = params[spec.name]
        shape = p["kernel"].shape
        p["kernel"] = rng.normal(0, 1 / math.sqrt(np.prod(shape[:-1])), shape).astype(np.float32)
        a_shape = p["alpha"].shape
        p["alpha"] = (np.exp(rng.uniform(np.log(0.5), np.log(2.0), a_shape))
                      * rng.choice([-1.0, 1.0], a_shape)).astype(np.float32)
        p["beta"] = np.zeros(spec.features, np.float32)
        _, pre = _apply_layer(net, params, x, i)
        flat = pre.reshape(-1, spec.features)
        spread = flat.std(0) + 1e-6
        if spec.a_bits == 1 and not spec.last:
            beta = -np.median(flat, 0) + rng.normal(0, 0.3, spec.features) * spread
        else:
            beta = rng.normal(0, 1.0, spec.features) * spread
        p["beta"] = beta.astype(np.float32)
        if "act_alpha" in p:
            pos = np.maximum(flat + beta, 0)
            p["act_alpha"] = np.float32(max(np.percentile(pos, 95), 1e-3))
        x = _apply_layer(net, params, x, i)[0].astype(np.float32)
    return params


def acc_steps(specs, params, std, per_channel):
    """Per layer: (r, s_out), r = |α|·s_x·s_w per output channel, from the network's
    definitions (1/std folded into the first kernel; s_out: act_alpha/(2^A−1), 1 for
    sign, max r for the logits)."""
    out, s_x = [], 1.0 / 255.0
    for i, spec in enumerate(specs):
        p = params[spec.name]
        kernel = np.asarray(p["kernel"], np.float32)
        if i == 0:  # a dense first kernel's row k reads input channel k mod C
            inv = 1.0 / np.asarray(std, np.float32)
            kernel = kernel * (np.tile(inv, kernel.shape[0] // inv.size) if kernel.ndim == 2 else inv)[:, None]
        s_w = np.asarray(student_weight(kernel, spec.w_bits, per_channel)[1], np.float64).reshape(-1)
        r = np.abs(np.broadcast_to(np.asarray(p["alpha"], np.float64).reshape(-1), (spec.features,))) * s_x * s_w
        if spec.last:
            s_out = r.max()
        elif spec.a_bits == 1:
            s_out = 1.0
        else:
            s_out = float(p["act_alpha"]) / (2 ** spec.a_bits - 1)
        out.append((r, s_out))
        s_x = s_out
    return out


def build(specs, data, requant, seed=0, bias_grid=False):
    """(net, params, layers, input_spec, images) of a random folded-like student."""
    mean, std, shape = DATASETS[data]
    net = make_network(specs, STUDENT, mean, std, requant=requant, bias_grid=bias_grid)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (N_EVAL, *shape), dtype=np.uint8)
    params = folded_like(rng, net, specs, images[:N_CALIB], requant == "channel")
    layers, input_spec = integerize(specs, params, mean, std, shape, requant == "channel")
    return net, params, layers, input_spec, images


def layer_errors(net, specs, params, layers, input_spec, images, std, per_channel, bias_grid=False):
    """Per layer, the same input codes through the float layer and the int64 reference:
    [(name, worst excess over the tolerance in output steps, fraction of mismatches)].
    With `bias_grid` the float β is the artifact's, so the bias term leaves the tolerance."""
    steps = acc_steps(specs, params, std, per_channel)
    x_float, x_int = images, np.asarray(images, np.int64)
    report = []
    for i, (spec, layer, (r, s_out)) in enumerate(zip(specs, layers, steps)):
        act, pre = _apply_layer(net, params, x_float, i)
        pad = input_spec["pad_value"] if i == 0 else 0
        acc = layer_acc(layer, x_int, np.asarray(layer["weight"], np.int64),
                        np.asarray(layer["bias"], np.int64), pad)
        y = output_stage(layer, acc, layer["multiplier"], layer["shift"])
        y = max_pool(y, spec.pool) if spec.pool else y
        pre = _pool(pre, spec.pool)
        if spec.a_bits == 1 and not spec.last:
            decided = np.abs(pre) > SIGN_MARGIN * r
            bad = decided & (y != np.where(pre >= 0, 1, -1))
            report.append((spec.name, float(bad.any()), float(bad.mean())))
            x_int = act.astype(np.int64)
        else:
            target = pre / s_out
            if not spec.last:
                target = np.clip(target, 0, 2 ** spec.a_bits - 1)
            tol = 0.5 + (0 if bias_grid else 0.5 * r / s_out) + EPS + REL_EPS * np.abs(target).max()
            excess = np.abs(y - target) - tol
            report.append((spec.name, float(excess.max()), float((excess > 0).mean())))
            if not spec.last:
                x_int = np.round(act / s_out).astype(np.int64)
                assert np.allclose(x_int * s_out, act, rtol=1e-5, atol=1e-3 * s_out), "float codes off-grid"
        x_float = act.astype(np.float32)
    return report


@pytest.mark.parametrize("specs,data,requant", _cases())
def test_each_layer_matches_fake_quant(specs, data, requant):
    net, params, layers, input_spec, images = build(specs, data, requant)
    assert [lay["name"] for lay in layers] == [s.name for s in specs]
    report = layer_errors(net, specs, params, layers, input_spec, images[:N_CALIB], DATASETS[data][1],
                          requant == "channel")
    failing = [(name, round(worst, 3), round(frac, 3)) for name, worst, frac in report if worst > 0]
    assert not failing, f"integer layers off the fake-quant ones (name, worst excess in steps, fraction): {failing}"


GRID_CASES = [c for c in _cases() if c.id.startswith(("W2A2", "W4A2", "W2A4", "W4A4", "W8A8", "mixed", "tiny_cnn"))]


@pytest.mark.parametrize("specs,data,requant", GRID_CASES)
def test_bias_on_the_grid_makes_every_layer_the_artifacts(specs, data, requant):
    """model.bias_grid: each float layer is its integer layer up to the output rounding
    (½ step + float noise, no r/2 of bias). The same parameters without it exceed that bound
    wherever r/s_out is large: the case for the option, and proof the bound can fail."""
    report = {}
    for grid in (True, False):
        net, params, layers, input_spec, images = build(specs, data, requant, bias_grid=grid)
        report[grid] = layer_errors(net, specs, params, layers, input_spec, images[:N_CALIB], DATASETS[data][1],
                                    requant == "channel", bias_grid=True)
    failing = [(name, round(worst, 3), round(frac, 3)) for name, worst, frac in report[True] if worst > 0]
    assert not failing, f"bias_grid layers off their integer layers (name, worst excess in steps, fraction): {failing}"
    if specs[1].w_bits == 2 and specs[1].a_bits == 2:  # coarse accumulator, coarse outputs: r/s_out is large
        assert any(worst > 0 for _, worst, _ in report[False])


def test_bias_on_the_grid_passes_the_gradient_straight_through():
    specs = chain_specs([(2, 2)] * 3, 8)
    mean, std, shape = DATASETS["mnist"]
    images = np.random.default_rng(1).integers(0, 256, (4, *shape), dtype=np.uint8)
    grads = {}
    for grid in (True, False):
        net = make_network(specs, STUDENT, mean, std, bias_grid=grid)
        params = jax.device_get(net.init(jax.random.PRNGKey(0), images[:1])["params"])
        params["conv2"]["beta"] = np.linspace(-0.3, 0.3, 8).astype(np.float32)
        pre = lambda b: net.apply({"params": {**params, "conv2": {**params["conv2"], "beta": b}}}, images,
                                  stop=2, capture=True)[1][1][1].sum()
        grads[grid] = np.asarray(jax.grad(pre)(params["conv2"]["beta"]))
        if grid:  # and the value moved onto the grid
            assert not np.allclose(np.asarray(net.apply({"params": params}, images, stop=2, capture=True)[1][1][1]),
                                   np.asarray(make_network(specs, STUDENT, mean, std).apply(
                                       {"params": params}, images, stop=2, capture=True)[1][1][1]))
    positions = images.shape[0] * 4 * 4  # 8×8 → conv1, pool 2 → 4×4 → conv2 (3×3 SAME): 4×4 per image
    np.testing.assert_array_equal(grads[True], np.full(8, positions, np.float32))
    np.testing.assert_array_equal(grads[True], grads[False])


def test_bias_on_the_grid_of_a_zero_alpha_stays_finite():
    beta = np.array([0.3, -0.7], np.float32)
    out = on_accumulator_grid(beta, np.array([0.0, 2.0], np.float32), 0.25, np.float32(0.5))
    np.testing.assert_array_equal(np.asarray(out), np.array([0.3, -0.75], np.float32))  # r = 0 keeps β; r = 0.25: −2.8 → −3


@pytest.mark.parametrize("specs,data,requant", [c for c in _cases() if c.id.startswith(("W4A4", "W2A8", "mixed"))])
def test_logits_argmax_agree(tmp_path, specs, data, requant):
    """End to end through the artifact file: argmax of the int logits vs the fake-quant ones."""
    net, params, layers, input_spec, images = build(specs, data, requant)
    write_artifact(str(tmp_path), layers=layers, input_spec=input_spec, config={}, metrics={})
    int_logits = reference_run(str(tmp_path), images)
    fq_logits = np.asarray(net.apply({"params": params}, images))
    agreement = np.mean(int_logits.argmax(-1) == fq_logits.argmax(-1))
    assert agreement >= 0.9, f"argmax agreement {agreement:.3f}"


def test_zero_point_is_per_channel():
    """The CIFAR-like input pads with each channel's own mean pixel."""
    *_, input_spec, _ = build(chain_specs([(4, 4)] * 3, 4), "cifar", "layer")
    assert input_spec == {"shape": [8, 8, 3], "pad_value": [125, 123, 114]}


def test_negative_alpha_flips_codes_keeps_multipliers_positive():
    specs = chain_specs([(4, 4)] * 3, 4)
    _, params, layers, *_ = build(specs, "cifar", "channel", seed=3)
    alpha = np.asarray(params["conv2"]["alpha"])
    assert (alpha < 0).any() and (alpha > 0).any()
    for layer in layers:
        assert (layer["multiplier"] > 0).all()
    kernel = np.asarray(params["conv2"]["kernel"])
    w = layers[1]["weight"].astype(np.int64)
    # the stored codes follow sign(α)·sign(kernel) wherever the kernel's code is nonzero
    nz = w != 0
    assert (np.sign(w) == (np.sign(kernel) * np.sign(alpha)))[nz].all()


# ---------------------------------------------------------------- dyadic(m)

def _check_dyadic(m):
    M, sh = dyadic(m)
    assert M.dtype == np.int32 and sh.dtype == np.int32 and M.shape == sh.shape == m.shape
    assert ((sh >= 0) & (sh <= 62)).all()
    unclipped = (sh > 0) & (sh < 62)
    assert ((M[unclipped] >= 2**29) & (M[unclipped] < 2**30)).all()
    approx = M.astype(np.float64) * np.exp2(-sh.astype(np.float64))
    rel = np.abs(approx - m) / m
    # round to nearest: ≤ 1/2 of the last unit of M, i.e. 2^-30 relative when M ≥ 2^29
    assert (rel <= 0.5 / M.astype(np.float64) * (1 + 1e-12)).all()
    assert (rel[unclipped] <= 2.0**-30 * (1 + 1e-12)).all()
    return M, sh


def test_dyadic_random_magnitudes():
    rng = np.random.default_rng(0)
    m = 10.0 ** rng.uniform(-9, 3, 5000)
    _, sh = _check_dyadic(m)
    assert ((sh > 0) & (sh < 62)).all()  # nothing in 1e-9..1e3 needs clipping


def test_dyadic_powers_of_two_and_rounding_carry():
    k = np.arange(-30, 10, dtype=np.float64)
    exact = np.exp2(k)
    M, sh = _check_dyadic(exact)
    assert (M == 2**29).all() and (M.astype(np.float64) * np.exp2(-sh.astype(np.float64)) == exact).all()
    # just below a power of two: m·2^shift rounds up to 2^30, which must carry into the shift
    below = exact * (1 - 2.0**-40)
    M, sh = _check_dyadic(below)
    assert (M == 2**29).all()
    _check_dyadic(exact * (1 + 2.0**-40))


def test_dyadic_clipped_shift():
    m = np.array([1e-12, 3e-15, 2.0**-40])  # below 2^-33: the shift stops at 62, M < 2^29
    M, sh = _check_dyadic(m)
    assert (sh == 62).all() and (M < 2**29).all()
    M, sh = _check_dyadic(np.array([2.0**29 + 3]))  # large: shift 0, M = round(m)
    assert sh[0] == 0 and M[0] == 2**29 + 3


@pytest.mark.parametrize("bad", [0.0, -1e-3, -5.0, np.nan, np.inf, -np.inf])
def test_dyadic_refuses_nonpositive_and_nonfinite(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        dyadic(np.array([0.5, bad]))


def test_dyadic_refuses_unrepresentable():
    with pytest.raises(ValueError, match="not representable"):
        dyadic(np.array([1e-20]))  # M would round to 0 at the largest shift
    with pytest.raises(ValueError, match="not representable"):
        dyadic(np.array([2.0**31]))  # needs a negative shift
