"""Integer interpreter vs the independent numpy int64 reference, bit for bit;
exact requantisation; integer-only audit; evaluate's checks."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
from int_reference import output_stage, random_student, reference_run, requant_reference  # noqa: E402

from bnfree_jax.export.artifact import write_artifact  # noqa: E402
from bnfree_jax.intsim import audit_float_ops, evaluate, load_artifact, run_int, run_int_with_stats  # noqa: E402
from bnfree_jax.intsim.requant import requant_out, requant_relu  # noqa: E402

SPECS = [dict(kind="conv", cout=40, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2),
         dict(kind="conv", cout=16, k=3, stride=2, padding=[[0, 1], [0, 1]]),
         dict(kind="dense", cout=32), dict(kind="dense", cout=10)]
PAD = [120, 3, 250]


def _build(tmp_path, w_bits, a_bits, seed=0, n=16):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
    layers = random_student(rng, imgs, SPECS, list(w_bits), list(a_bits) + [32], PAD)
    d = str(tmp_path / "art")
    write_artifact(d, layers=layers, input_spec={"shape": [12, 12, 3], "pad_value": PAD}, config={}, metrics={})
    return d, load_artifact(d), imgs


@pytest.mark.parametrize("a", [1, 2, 4, 8])
@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_interpreter_matches_reference_bit_for_bit(tmp_path, w, a):
    d, art, imgs = _build(tmp_path, [w] * 4, [a] * 3, seed=10 * w + a)
    logits, acc_max = run_int_with_stats(art, imgs)
    ref, accs = reference_run(d, imgs, return_accs=True)
    assert logits.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(logits), ref)
    assert np.asarray(acc_max).tolist() == [int(np.abs(x).max()) for x in accs]
    assert len(np.unique(ref)) > 20                      # logits spread, not saturated
    first = output_stage({"output": "sign" if a == 1 else "requant_relu", "a_bits": a}, accs[0],
                         art.multipliers[0], art.shifts[0])
    assert len(np.unique(first)) >= min(2 ** a, 2) and len(np.unique(first)) >= 0.5 * min(2 ** a, 64)
    assert [layer.binary for layer in art.layers] == [False] + [w == 1 and a == 1] * 3


@pytest.mark.parametrize("w_bits,a_bits", [([8, 1, 1, 8], [1, 1, 1]), ([4, 1, 2, 8], [8, 1, 4]),
                                           ([1, 8, 2, 4], [1, 2, 8])])
def test_mixed_widths_match_reference(tmp_path, w_bits, a_bits):
    d, art, imgs = _build(tmp_path, w_bits, a_bits, seed=sum(w_bits) + 7)
    np.testing.assert_array_equal(np.asarray(run_int(art, imgs)), reference_run(d, imgs))
    want = [False] + [w_bits[i] == 1 and a_bits[i - 1] == 1 for i in range(1, 4)]
    assert [layer.binary for layer in art.layers] == want


POOLED = [dict(kind="conv", cout=33, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2),
          dict(kind="conv", cout=40, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2),
          dict(kind="conv", cout=24, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=3),
          dict(kind="dense", cout=10)]


@pytest.mark.parametrize("w_bits,a_bits", [([8, 1, 1, 8], [1, 1, 1]), ([8, 1, 1, 8], [8, 1, 1])])
def test_pooled_binary_convs_match_reference(tmp_path, w_bits, a_bits):
    """Binary convs followed by max-pool (windows 2 and 3) take their own code path."""
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    layers = random_student(rng, imgs, POOLED, w_bits, a_bits + [32], PAD)
    d = str(tmp_path / "pooled")
    write_artifact(d, layers=layers, input_spec={"shape": [12, 12, 3], "pad_value": PAD}, config={}, metrics={})
    art = load_artifact(d)
    assert art.layers[1].binary == (a_bits[0] == 1) and art.layers[2].binary
    ref, accs = reference_run(d, imgs, return_accs=True)
    for bs in (None, 4):
        logits, acc_max = run_int_with_stats(art, imgs, batch_size=bs)
        np.testing.assert_array_equal(np.asarray(logits), ref)
        assert np.asarray(acc_max).tolist() == [int(np.abs(x).max()) for x in accs]
    assert audit_float_ops(lambda x: run_int(art, x), imgs[:2])["count"] == 0


def test_batched_equals_unbatched(tmp_path):
    _, art, imgs = _build(tmp_path, [1, 1, 1, 8], [1, 1, 1], seed=3)
    full, stats = run_int_with_stats(art, imgs)
    chunked, cstats = run_int_with_stats(art, imgs, batch_size=8)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(chunked))
    np.testing.assert_array_equal(np.asarray(stats), np.asarray(cstats))


def test_requant_is_exact_int64_formula():
    rng = np.random.default_rng(0)
    n = 20000
    acc = rng.integers(-2**31, 2**31, n, dtype=np.int64)
    acc[:4] = [-2**31, 2**31 - 1, 0, -1]
    acc[4:5000] = rng.integers(-3000, 3000, 4996)
    mult = np.maximum(1, rng.integers(1, 2**31, n, dtype=np.int64) >> rng.integers(0, 31, n))
    mult[:8] = 2**31 - 1
    shift = rng.integers(0, 63, n, dtype=np.int64)
    shift[:3] = [0, 62, 32]
    ref = requant_reference(acc, mult, shift)
    args = [jnp.asarray(v, jnp.int32) for v in (acc, mult, shift)]
    np.testing.assert_array_equal(np.asarray(jax.jit(requant_out)(*args)), np.clip(ref, -2**31, 2**31 - 1))
    relu = jax.jit(requant_relu, static_argnums=3)
    for a_bits in (1, 4, 8):
        np.testing.assert_array_equal(np.asarray(relu(*args, a_bits)), np.clip(ref, 0, 2**a_bits - 1))
    # rounding is half up: 5*1 + 2^0 >> 1 = 3, -5 -> -2
    assert np.asarray(requant_out(jnp.array([5, -5, 6]), jnp.array([1]), jnp.array([1]))).tolist() == [3, -2, 3]


def test_interpreter_is_integer_only(tmp_path):
    _, art, imgs = _build(tmp_path, [8, 1, 1, 8], [1, 1, 1], seed=4)
    report = audit_float_ops(lambda x: run_int(art, x), imgs)
    assert report == {"count": 0, "examples": []}
    _, art4, _ = _build(tmp_path / "w4", [8, 4, 4, 8], [8, 4, 4], seed=5)
    assert audit_float_ops(lambda x: run_int(art4, x, batch_size=7), imgs)["count"] == 0


def test_audit_finds_floats_hidden_in_subjaxprs(tmp_path):
    _, art, imgs = _build(tmp_path, [4, 4, 4, 8], [4, 4, 4], seed=6)

    def in_cond(x):
        y = run_int(art, x)
        return lax.cond(y[0, 0] > 0, lambda v: v, lambda v: (v.astype(jnp.float32) * 0.5).astype(jnp.int32), y)

    def in_scan(x):
        def body(c, _):
            return (c.astype(jnp.float32) * 1.5).astype(jnp.int32), None
        return lax.scan(body, run_int(art, x), None, length=2)[0]

    @jax.custom_jvp
    def f(v):
        return v * 2.0
    f.defjvp(lambda p, t: (f(p[0]), t[0] * 2.0))

    def in_custom_jvp_in_jit(x):
        return jax.jit(lambda v: f(v.astype(jnp.float32)).astype(jnp.int32))(run_int(art, x))

    def int_only(x):
        y = run_int(art, x)
        y = lax.cond(y[0, 0] > 0, lambda v: v + 1, lambda v: v * 3, y)
        return lax.scan(lambda c, _: (c >> 1, None), y, None, length=3)[0]

    for fn in (in_cond, in_scan, in_custom_jvp_in_jit):
        report = audit_float_ops(fn, imgs)
        assert report["count"] > 0 and any("float32" in e for e in report["examples"])
    assert any("cond" in e for e in audit_float_ops(in_cond, imgs)["examples"])
    assert any("scan" in e for e in audit_float_ops(in_scan, imgs)["examples"])
    assert any("custom_jvp" in e for e in audit_float_ops(in_custom_jvp_in_jit, imgs)["examples"])
    assert audit_float_ops(int_only, imgs)["count"] == 0


def test_evaluate_counts_and_validates(tmp_path):
    d, art, imgs = _build(tmp_path, [2, 2, 2, 8], [2, 2, 2], seed=8)
    ref, accs = reference_run(d, imgs, return_accs=True)
    labels = np.argmax(ref, axis=1)
    labels[:5] = (labels[:5] + 1) % 10
    out = evaluate(art, imgs, labels, batch_size=6)
    assert out["n"] == 16 and out["correct"] == 11 and out["top1"] == 11 / 16
    assert list(out["max_abs_acc"].values()) == [int(np.abs(a).max()) for a in accs]
    assert all(out["max_abs_acc"][k] <= out["acc_bound"][k] for k in out["acc_bound"])
    with pytest.raises(ValueError, match="uint8"):
        evaluate(art, imgs.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"shape \[N, 12, 12, 3\]"):
        evaluate(art, imgs[:, :10], labels)
    with pytest.raises(ValueError, match="labels"):
        evaluate(art, imgs, labels[:3])
