"""Gradient diagnostics (train/diagnostics.py): per-layer gradient norms, the clipped
fraction at each activation quantizer's input (after pooling), the STE mismatch, their
place in metrics.jsonl (log steps only, training unchanged) and the report's plot."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnfree_jax.nn.factory import NetFactory
from bnfree_jax.nn.network import STUDENT, make_network, record_quantizer_inputs
from bnfree_jax.nn.zoo import tiny_cnn, with_bits
from bnfree_jax.pipeline.layer_stats import clip_ratio, collect_layer_stats, quantizer_inputs
from bnfree_jax.report.plots import plot_gradients
from bnfree_jax.report.readers import read_diagnostics
from bnfree_jax.train import create_train_state, make_mesh
from bnfree_jax.train.diagnostics import make_diagnostics
from bnfree_jax.train.loop import run_loop
from bnfree_jax.train.phase import on_mesh
from bnfree_jax.train.step import make_train_step

MEAN, STD = (0.1307,), (0.3081,)


def _net(quantized: bool):
    specs = with_bits(tiny_cnn(), 4, 4) if quantized else tiny_cnn()
    return make_network(specs, STUDENT, MEAN, STD)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (n,)).astype(np.int32)}


def _ce(net, student, batch):
    logits = net.apply({"params": student}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def _loss_fn(net):
    """A student phase's loss over the distillation's tree layout {"S": {layer: ...}}."""
    def loss_fn(params, model_state, frozen, batch, rng):
        return _ce(net, params["S"], batch), ({}, {})
    return loss_fn


def _params(net, seed=0):
    return jax.device_get(net.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1), jnp.uint8))["params"])


def _grad(net, params, batch):
    """The plain gradient, jitted: eager and compiled float arithmetic can differ by an ulp,
    enough to move a value across a quantizer's rounding boundary."""
    return jax.jit(jax.grad(lambda p: _ce(net, p, batch)))(params)


def _probe(net, params, batch):
    mesh = make_mesh()
    state = on_mesh(create_train_state({"S": params}, optax.sgd(0.1), rng=0), mesh)
    return jax.device_get(make_diagnostics(_loss_fn(net), mesh)(state, on_mesh({}, mesh), batch))


def _flat(tree, skip=()):
    return np.concatenate([np.asarray(x).ravel() for path, x in jax.tree_util.tree_leaves_with_path(tree)
                           if not any(getattr(k, "key", None) in skip for k in path)])


def test_grad_norms_equal_a_direct_grad():
    net, batch = _net(True), _batch()
    params = _params(net)
    out = _probe(net, params, batch)
    grads = _grad(net, params, batch)
    for name in ("conv1", "conv2", "fc3"):
        want = np.linalg.norm(_flat(grads[name]))
        assert want > 0
        np.testing.assert_allclose(out[f"grad_norm/S/{name}"], want, rtol=1e-5)
    assert not any(k.startswith("grad_norm/") and k.count("/") != 2 for k in out)


def test_clip_fraction_counts_the_pooled_quantizer_input():
    net, batch = _net(True), _batch()
    params = _params(net)
    _, trace = net.apply({"params": params}, batch["image"], capture=True)
    pre = np.asarray(trace[0][1])  # conv1's pre-activation, before ReLU and pooling
    alpha = float(np.quantile(np.maximum(pre, 0), 0.7)) + 1e-4  # equal to no value
    params["conv1"]["act_alpha"] = np.float32(alpha)
    out = _probe(net, params, batch)
    relu = np.maximum(pre, 0)
    pooled = relu.reshape(8, 4, 2, 4, 2, -1).max(axis=(2, 4))
    hi, lo = np.mean(pooled >= alpha), np.mean(pooled <= 0)
    np.testing.assert_allclose(out["clip_hi/conv1"], hi, atol=1e-6)
    np.testing.assert_allclose(out["clip_lo/conv1"], lo, atol=1e-6)
    assert abs(hi - np.mean(pre > alpha)) > 0.05  # a pre-pool count would be wrong
    assert "clip_hi/fc3" not in out  # the logits layer has no activation quantizer
    # the report's clip ratio reads the same post-pool input
    xs = quantizer_inputs(net, {"params": params}, batch["image"])
    np.testing.assert_allclose(clip_ratio(xs[0], alpha), hi, atol=1e-6)
    assert xs[-1] is None
    nets = NetFactory(float_specs=tuple(tiny_cnn()), quant_specs=net.specs, mean=MEAN, std=STD,
                      image_shape=(8, 8, 1))
    feed = types.SimpleNamespace(eval_arrays=lambda n: (batch["image"][:n], batch["label"][:n]))
    stats = collect_layer_stats(nets, feed, params, None, n_probe=8)
    np.testing.assert_allclose(stats.clip_ratio[0], hi, atol=1e-6)


def test_sign_quantizer_saturates_outside_minus_one_one():
    specs = with_bits(tiny_cnn(), 1, 1)
    net = make_network(specs, STUDENT, MEAN, STD)
    params, batch = _params(net), _batch()
    with record_quantizer_inputs() as found:
        net.apply({"params": params}, batch["image"])
        x = np.asarray(found["conv1"][0])
    out = _probe(net, params, batch)
    np.testing.assert_allclose(out["clip_hi/conv1"], np.mean(x >= 1), atol=1e-6)
    np.testing.assert_allclose(out["clip_lo/conv1"], np.mean(x <= -1), atol=1e-6)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_ste_mismatch_is_one_for_float_specs():
    net, batch = _net(False), _batch()
    out = _probe(net, _params(net), batch)
    for name in ("conv1", "conv2", "fc3"):
        np.testing.assert_allclose(out[f"ste_cos/{name}"], 1.0, atol=1e-5)


def test_ste_mismatch_against_independent_grads():
    qnet, fnet, batch = _net(True), _net(False), _batch()
    params = _params(qnet)
    out = _probe(qnet, params, batch)
    ste = _grad(qnet, params, batch)
    flt = _grad(fnet, {k: {n: v for n, v in p.items() if n != "act_alpha"} for k, p in params.items()}, batch)
    cos = {n: _cos(_flat(ste[n], skip=("act_alpha",)), _flat(flt[n])) for n in ("conv1", "conv2", "fc3")}
    for name, want in cos.items():
        np.testing.assert_allclose(out[f"ste_cos/{name}"], want, rtol=1e-4, atol=1e-6)
    assert min(cos.values()) < 0.999


def test_teacher_phase_has_no_ste_mismatch():
    net, batch = _net(True), _batch()
    mesh = make_mesh()
    state = on_mesh(create_train_state(_params(net), optax.sgd(0.1), rng=0), mesh)
    loss = lambda p, ms, fr, b, rng: (_ce(net, p, b), ({}, {}))
    out = jax.device_get(make_diagnostics(loss, mesh)(state, on_mesh({}, mesh), batch))
    assert "grad_norm/conv1" in out and not any(k.startswith("ste_cos/") for k in out)


def _run(tmp_path, name, diagnose: bool, calls: list):
    net = _net(True)
    mesh = make_mesh()
    tx = optax.adam(1e-2)
    state = on_mesh(create_train_state({"S": _params(net)}, tx, rng=0), mesh)
    probe = make_diagnostics(_loss_fn(net), mesh)

    def counted(s, f, b):
        calls.append(int(jax.device_get(s.step)) + 1)
        return probe(s, f, b)

    path = tmp_path / f"{name}.jsonl"
    final = run_loop(step_fn=make_train_step(_loss_fn(net), tx, mesh), state=state, frozen=on_mesh({}, mesh),
                     batches=[_batch(seed=i) for i in range(5)], mesh=mesh, num_steps=5,
                     metrics_path=path, phase="stage1_conv1", log_every=2, progress=False,
                     diagnostics=counted if diagnose else None)
    return final, [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_get_the_keys_on_log_steps_and_training_is_unchanged(tmp_path):
    calls: list = []
    with_diag, records = _run(tmp_path, "on", True, calls)
    without, plain = _run(tmp_path, "off", False, [])
    assert calls == [2, 4, 5] == [r["step"] for r in records]
    for r in records:
        assert {"grad_norm/S/conv1", "clip_hi/conv1", "clip_lo/conv2", "ste_cos/fc3"} <= set(r)
    assert not any("/" in k for r in plain for k in r)
    assert [r["loss"] for r in records] == [r["loss"] for r in plain]
    for a, b in zip(jax.tree.leaves(jax.device_get(with_diag.params)), jax.tree.leaves(jax.device_get(without.params))):
        np.testing.assert_array_equal(a, b)


def test_report_reads_and_plots_the_diagnostics(tmp_path):
    _, records = _run(tmp_path, "m", True, [])
    extra = {"phase": "finetune", "step": 3, "loss": 1.0, "grad_norm/S/conv1": 0.5, "ste_cos/conv1": 0.9}
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n" + "not json\n")
    diag = read_diagnostics(tmp_path / "m.jsonl")
    assert list(diag) == ["stage1_conv1", "finetune"]
    assert diag["stage1_conv1"]["ste_cos/conv1"] == pytest.approx(records[-1]["ste_cos/conv1"])
    assert diag["finetune"] == {"grad_norm/S/conv1": 0.5, "ste_cos/conv1": 0.9}
    path = plot_gradients(diag, tmp_path / "gradients.png")
    assert path is not None and (tmp_path / "gradients.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_gradients({}, tmp_path / "none.png") is None
