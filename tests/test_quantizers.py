"""Quantizers: forward against numpy references, backward against the documented rules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bnfree_jax.quant import (QTensor, approx_sign, dorefa_activation, dorefa_weight,
                              lsq_default_grad_scale, lsq_quantize, pact_quantize,
                              qrange, round_half_away, round_ste, sign_ste,
                              symmetric_weight, uniform_quantize)

F32 = np.float32


def vjp(f, *args, g=None):
  """Gradients of f at args under cotangent g (random, so a rule that drops g fails)."""
  out, pull = jax.vjp(f, *args)
  if g is None:
    g = np.random.default_rng(1).uniform(0.5, 2.0, np.shape(out)).astype(F32)
  return g, pull(jnp.asarray(g))


def np_round(x):
  """Reference: half away from zero in float64 (exact for float32 inputs)."""
  x = np.asarray(x, np.float64)
  return np.sign(x) * np.floor(np.abs(x) + 0.5)


def np_fake_quant(x, s, bits, signed):
  qmin, qmax = qrange(bits, signed)
  v = np.asarray(x, F32) / np.asarray(s, F32)
  c = np.where(v >= 0, 1, -1) if (signed and bits == 1) else np.clip(np_round(v), qmin, qmax)
  return c.astype(F32), v


# ---------------------------------------------------------------- rounding, sign

def test_round_half_away_from_zero_ties_and_below_half():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, -0.49, 0.49], F32)
  np.testing.assert_array_equal(round_ste(x), [-3, -2, -1, 1, 2, 3, -0, 0])
  below = np.nextafter(F32(0.5), F32(0))  # floor(|x| + 0.5) gets this one wrong
  np.testing.assert_array_equal(round_half_away(jnp.array([below, -below])), [0, 0])
  r = np.random.default_rng(0).uniform(-300, 300, 10000).astype(F32)
  r[:100] = np.round(r[:100]) + 0.5  # exact ties
  np.testing.assert_array_equal(round_ste(jnp.asarray(r)), np_round(r))


def test_round_ste_backward_identity():
  x = jnp.array([-2.5, -0.7, 0.0, 0.5, 3.2], F32)
  g, (gx,) = vjp(round_ste, x)
  np.testing.assert_array_equal(gx, g)


def test_sign_ste_forward_never_zero_and_clipped_backward():
  x = jnp.array([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.0001, 2.0], F32)
  np.testing.assert_array_equal(sign_ste(x), [-1, -1, -1, 1, 1, 1, 1, 1, 1])
  g, (gx,) = vjp(sign_ste, x)
  np.testing.assert_array_equal(gx, g * (np.abs(np.asarray(x)) <= 1))


def test_approx_sign_backward_is_bireal_polynomial_derivative():
  x = jnp.array([-1.5, -1.0, -0.75, -0.25, 0.0, 0.3, 0.9, 1.0, 4.0], F32)
  np.testing.assert_array_equal(approx_sign(x), np.where(np.asarray(x) >= 0, 1, -1))
  g, (gx,) = vjp(approx_sign, x)
  a = np.abs(np.asarray(x))
  np.testing.assert_array_equal(gx, np.where(a < 1, g * (2 - 2 * a), 0).astype(F32))


def test_approx_sign_backward_matches_finite_differences_of_bireal_curve():
  # Forward = Bi-Real's piecewise polynomial F, backward = approx_sign's rule:
  # check_grads compares the rule with finite differences of F.
  def bireal(x):
    return jnp.where(x < -1, -1.0, jnp.where(x < 0, 2 * x + x * x,
                                             jnp.where(x < 1, 2 * x - x * x, 1.0)))

  def h(x):
    return approx_sign(x) + jax.lax.stop_gradient(bireal(x) - approx_sign(x))

  x = jnp.array([-0.8, -0.45, -0.1, 0.15, 0.6, 0.85, 1.7, -2.2], F32)
  check_grads(h, (x,), order=1, modes=["rev"], eps=1e-2, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------- uniform / LSQ

@pytest.mark.parametrize("bits,signed", [(1, True), (1, False), (2, True), (3, False),
                                         (4, True), (8, True), (8, False)])
def test_uniform_forward_matches_reference(bits, signed):
  x = np.random.default_rng(bits).normal(0, 3, (64, 5)).astype(F32)
  s = np.linspace(0.1, 0.9, 5).astype(F32)
  c, _ = np_fake_quant(x, s, bits, signed)
  np.testing.assert_array_equal(uniform_quantize(x, s, bits, signed), c * s)


def lsq_case():
  """x on every regime for 4-bit signed with step 0.5: v = x/0.5."""
  x = np.array([-9.0, -3.5, -3.4, -1.3, -0.25, 0.0, 0.7, 1.3, 3.4, 3.5, 3.6, 12.0], F32)
  return x, F32(0.5)


def lsq_step_rule(x, s, bits, signed):
  qmin, qmax = qrange(bits, signed)
  c, v = np_fake_quant(x, s, bits, signed)
  return np.where(v <= qmin, qmin, np.where(v >= qmax, qmax, c - v)), v


def test_uniform_gradients_interior_boundary_outside_exact():
  x, s = lsq_case()
  g, (gx, gs) = vjp(lambda x, s: uniform_quantize(x, s, 4, True), jnp.asarray(x), s)
  v = x / s
  # v = -7 and v = 7 are exactly at the clip bounds: the gradient passes there.
  np.testing.assert_array_equal(gx, g * ((v >= -7) & (v <= 7)))
  assert gx[1] == g[1] and gx[9] == g[9] and gx[0] == 0 and gx[10] == 0
  rule, _ = lsq_step_rule(x, s, 4, True)
  assert np.sum(np.abs(rule)) > 20  # the sum is not trivially zero
  np.testing.assert_allclose(gs, np.sum(g * rule), rtol=1e-6, atol=1e-5)


def test_lsq_step_gradient_formula_and_default_grad_scale():
  x, s = lsq_case()
  g, (gx, gs) = vjp(lambda x, s: lsq_quantize(x, s, 4, True), jnp.asarray(x), s)
  rule, v = lsq_step_rule(x, s, 4, True)
  assert rule[1] == -7 and rule[9] == 7 and rule[0] == -7 and rule[-1] == 7  # at/beyond bounds
  np.testing.assert_allclose(rule[3], np_round(-2.6) + 2.6, rtol=1e-6)     # inside: 0.4
  gscale = 1 / np.sqrt(x.size * 7)
  np.testing.assert_allclose(gs, gscale * np.sum(g * rule), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(gx, g * ((v >= -7) & (v <= 7)))


def test_lsq_per_channel_step_sums_other_axes_and_explicit_grad_scale():
  x = np.random.default_rng(2).normal(0, 2, (6, 4, 3)).astype(F32)
  step = np.array([[[0.2, 0.5, 1.1]]], F32)
  for signed, bits in [(True, 3), (False, 2), (True, 1)]:
    g, (gs,) = vjp(lambda s: lsq_quantize(x, s, bits, signed, grad_scale=0.3), step)
    rule, _ = lsq_step_rule(x, step, bits, signed)
    assert gs.shape == step.shape
    np.testing.assert_allclose(gs, 0.3 * np.sum(g * rule, axis=(0, 1), keepdims=True),
                               rtol=1e-5, atol=1e-6)
  assert lsq_default_grad_scale(x, step, 4, True) == pytest.approx(1 / np.sqrt(24 * 7))


def test_lsq_unsigned_below_zero_step_gradient_is_qmin_zero():
  x = np.array([-2.0, -0.1, 0.2, 9.0], F32)
  g, (gx, gs) = vjp(lambda x, s: lsq_quantize(x, s, 2, False, grad_scale=1.0),
                    jnp.asarray(x), F32(1.0))
  np.testing.assert_array_equal(gx, g * np.array([0, 0, 1, 0]))
  np.testing.assert_allclose(gs, g[2] * (0 - 0.2) + g[3] * 3, rtol=1e-6)


# ---------------------------------------------------------------- PACT

def test_pact_forward_and_gradients_exact():
  x = np.array([-1.0, 0.0, 0.3, 1.0, 1.49, 2.0, 2.0001, 5.0], F32)
  alpha = F32(2.0)
  s = alpha / F32(3)
  np.testing.assert_array_equal(pact_quantize(x, alpha, 2),
                                np.clip(np_round(np.clip(x, 0, alpha) / s), 0, 3).astype(F32) * s)
  g, (gx, ga) = vjp(lambda x, a: pact_quantize(x, a, 2), jnp.asarray(x), alpha)
  np.testing.assert_array_equal(gx, g * ((x >= 0) & (x < alpha)))   # x == alpha: 0
  np.testing.assert_allclose(ga, np.sum(g * (x >= alpha)), rtol=1e-6)  # x == alpha counts


def test_pact_per_channel_alpha():
  x = np.random.default_rng(3).normal(1, 2, (10, 3)).astype(F32)
  alpha = np.array([0.5, 1.5, 3.0], F32)
  g, (ga,) = vjp(lambda a: pact_quantize(x, a, 4), alpha)
  np.testing.assert_allclose(ga, np.sum(g * (x >= alpha), axis=0), rtol=1e-6)


def test_pact_gradients_match_finite_differences_of_clip():
  # Forward = clip(x, 0, alpha), backward = PACT's rule (away from the kinks).
  def h(x, a):
    q = pact_quantize(x, a, 3)
    return q + jax.lax.stop_gradient(jnp.clip(x, 0, a) - q)

  x = jnp.array([-0.7, 0.4, 0.9, 1.3, 2.1, 3.0], F32)
  check_grads(h, (x, F32(1.6)), order=1, modes=["rev"], eps=1e-2, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------- DoReFa, symmetric

def test_dorefa_weight_binary_and_multibit_reference():
  w = np.random.default_rng(4).normal(0, 0.7, (5, 7)).astype(F32)
  np.testing.assert_allclose(dorefa_weight(w, 1),
                             np.where(w >= 0, 1, -1) * np.abs(w).mean(), rtol=1e-6)
  g, (gw,) = vjp(lambda w: dorefa_weight(w, 1), jnp.asarray(w))
  np.testing.assert_array_equal(gw, g)  # straight through, unclipped
  for bits in (2, 3, 5):
    n = 2 ** bits - 1
    t = np.tanh(w.astype(np.float64))
    ref = 2 * np_round(n * (t / (2 * np.abs(t).max()) + 0.5)) / n - 1
    np.testing.assert_allclose(dorefa_weight(w, bits), ref, atol=1e-6)
    qt = dorefa_weight(w, bits, as_qtensor=True)
    assert qt.bits == bits + 1 and set(np.unique(qt.codes) % 2) <= {1.0}


def test_dorefa_weight_gradient_is_autodiff_of_the_unrounded_map():
  w = jnp.asarray(np.random.default_rng(5).normal(0, 1, (4, 6)).astype(F32))
  smooth = lambda w: 2 * (jnp.tanh(w) / (2 * jnp.max(jnp.abs(jnp.tanh(w)))) + 0.5) - 1
  g, (gq,) = vjp(lambda w: dorefa_weight(w, 3), w)
  _, (gs,) = vjp(smooth, w, g=g)
  np.testing.assert_allclose(gq, gs, rtol=1e-5, atol=1e-6)


def test_dorefa_activation_forward_and_clip_gradient():
  x = np.array([-0.5, 0.0, 0.2, 0.5, 0.99, 1.0, 1.2], F32)
  n = 7
  np.testing.assert_allclose(dorefa_activation(x, 3), np_round(n * np.clip(x, 0, 1)) / n,
                             atol=1e-7)
  g, (gx,) = vjp(lambda x: dorefa_activation(x, 3), jnp.asarray(x))
  np.testing.assert_allclose(gx, g * ((x >= 0) & (x <= 1)), rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_weight_per_channel_is_per_tensor_slice_by_slice(bits):
  w = np.random.default_rng(bits).normal(0, 0.3, (3, 3, 4, 5)).astype(F32)
  qt = symmetric_weight(w, bits, channel_axis=-1, as_qtensor=True)
  qmax = 2 ** (bits - 1) - 1
  assert qt.scale.shape == (1, 1, 1, 5) and np.allclose(qt.scale, 1 / qmax)
  codes = np.asarray(qt.codes)
  assert np.all(np.abs(codes).reshape(-1, 5).max(0) == qmax)  # each channel reaches qmax
  for c in range(5):
    np.testing.assert_array_equal(symmetric_weight(w[..., c], bits), qt.dequantize()[..., c])
  t = np.tanh(w.astype(np.float64))
  np.testing.assert_array_equal(codes, np_round(t / np.abs(t).max(axis=(0, 1, 2)) * qmax))


def test_symmetric_weight_binary_scale_is_mean_abs_per_channel():
  w = np.random.default_rng(6).normal(0, 0.3, (8, 3)).astype(F32)
  qt = symmetric_weight(w, 1, channel_axis=1, as_qtensor=True)
  np.testing.assert_array_equal(qt.codes, np.where(w >= 0, 1, -1))
  np.testing.assert_allclose(qt.scale, np.abs(w).mean(0, keepdims=True), rtol=1e-6)
  np.testing.assert_array_equal(symmetric_weight(w, 1), dorefa_weight(w, 1))
  g, (gw,) = vjp(lambda w: symmetric_weight(w, 1, channel_axis=1), jnp.asarray(w))
  np.testing.assert_array_equal(gw, g)


@pytest.mark.parametrize("axis", [None, -1])
def test_symmetric_weight_gradient_matches_finite_differences_of_normalisation(axis):
  # Backward = derivative of tanh(w)/max|tanh w| (round straight through); the
  # forward of h is that smooth map, so check_grads sees the max term too.
  def smooth(w):
    t = jnp.tanh(w)
    ax = None if axis is None else (0,)
    return t / jnp.max(jnp.abs(t), axis=ax, keepdims=True)

  def h(w):
    q = symmetric_weight(w, 4, channel_axis=axis)
    return q + jax.lax.stop_gradient(smooth(w) - q)

  w = np.random.default_rng(7).normal(0, 0.3, (6, 3)).astype(F32)
  w[0] = [1.2, -1.5, 2.0]  # a clear maximum per channel and per tensor
  check_grads(h, (jnp.asarray(w),), order=1, modes=["rev"], eps=1e-2, atol=3e-3, rtol=3e-3)


# ---------------------------------------------------------------- QTensor, ranges

def all_quantizers(bits, signed):
  x = np.random.default_rng(bits).laplace(0, 1.5, (32, 4)).astype(F32)
  x[0, 0], x[1, 1] = 40.0, -40.0
  s = np.array([0.1, 0.3, 0.5, 0.05], F32)
  out = {
      "uniform": lambda q: uniform_quantize(x, s, bits, signed, as_qtensor=q),
      "lsq": lambda q: lsq_quantize(x, s, bits, signed, as_qtensor=q),
  }
  if signed:
    out["symmetric"] = lambda q: symmetric_weight(x, bits, channel_axis=-1, as_qtensor=q)
    out["dorefa_w"] = lambda q: dorefa_weight(x, bits, as_qtensor=q)
  else:
    out["pact"] = lambda q: pact_quantize(x, F32(2.5), bits, as_qtensor=q)
    out["dorefa_a"] = lambda q: dorefa_activation(x, bits, as_qtensor=q)
  return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_integers_in_range_and_dequantize_equals_fake_quant(bits, signed):
  for name, f in all_quantizers(bits, signed).items():
    qt = f(True)
    assert isinstance(qt, QTensor), name
    codes = np.asarray(qt.codes)
    lo, hi = qrange(qt.bits, qt.signed)
    assert np.all(codes == np.round(codes)) and codes.min() >= lo and codes.max() <= hi, name
    if qt.signed and qt.bits == 1:
      assert set(np.unique(codes)) <= {-1.0, 1.0}, name
    np.testing.assert_array_equal(qt.dequantize(), f(False), err_msg=name)
    np.testing.assert_array_equal(qt.int_codes(jnp.int16), codes.astype(np.int16))


def test_int_codes_dtype_and_pytree_structure():
  qt = symmetric_weight(np.linspace(-1, 1, 12, dtype=F32).reshape(3, 4), 4, -1, True)
  assert qt.int_codes().dtype == jnp.int8
  leaves, tree = jax.tree.flatten(qt)
  assert len(leaves) == 2
  back = jax.tree.unflatten(tree, leaves)
  assert back.bits == 4 and back.signed
  jitted = jax.jit(lambda w: symmetric_weight(w, 4, -1, True))(jnp.ones((3, 4)))
  assert isinstance(jitted, QTensor) and jitted.bits == 4


def test_qtensor_dequantize_gradients_equal_plain_gradients():
  x = jnp.asarray(np.random.default_rng(8).normal(0, 2, (16, 3)).astype(F32))
  s = jnp.array([0.3, 0.6, 0.9], F32)
  w = jnp.asarray(np.random.default_rng(9).normal(0, 1, (16, 3)).astype(F32))
  cases = [
      lambda x, s, q: uniform_quantize(x, s, 3, True, as_qtensor=q),
      lambda x, s, q: lsq_quantize(x, s, 4, False, as_qtensor=q),
      lambda x, s, q: lsq_quantize(x, s, 1, True, as_qtensor=q),
      lambda x, s, q: pact_quantize(x, 3 * s, 3, as_qtensor=q),
      lambda x, s, q: symmetric_weight(x * s, 3, -1, as_qtensor=q),
      lambda x, s, q: symmetric_weight(x * s, 1, -1, as_qtensor=q),
      lambda x, s, q: dorefa_weight(x * s, 3, as_qtensor=q),
      lambda x, s, q: dorefa_activation(x * s, 2, as_qtensor=q),
  ]
  for f in cases:
    plain = jax.jit(jax.grad(lambda x, s: jnp.sum(w * f(x, s, False)), (0, 1)))(x, s)
    viaqt = jax.jit(jax.grad(lambda x, s: jnp.sum(w * f(x, s, True).dequantize()),
                             (0, 1)))(x, s)
    for a, b in zip(plain, viaqt):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_idempotence():
  x = jnp.asarray(np.random.default_rng(10).normal(0, 2, (50, 3)).astype(F32))
  s = jnp.array([0.07, 0.4, 1.3], F32)
  fs = [lambda x: uniform_quantize(x, s, 4, True), lambda x: uniform_quantize(x, s, 3, False),
        lambda x: uniform_quantize(x, s, 1, True), lambda x: lsq_quantize(x, s, 5, True),
        lambda x: pact_quantize(x, F32(1.7), 4), lambda x: pact_quantize(x, s, 2),
        lambda x: dorefa_activation(x, 3), round_ste, sign_ste, approx_sign]
  for f in fs:
    q = f(x)
    np.testing.assert_array_equal(f(q), q)


# ---------------------------------------------------------------- transforms

def test_jit_vmap_grad_compose():
  x = jnp.asarray(np.random.default_rng(11).normal(0, 1, (5, 8)).astype(F32))
  w = jnp.asarray(np.random.default_rng(12).normal(0, 1, (8, 4)).astype(F32))

  def loss(w, x, step, alpha):
    h = x @ symmetric_weight(w, 3, channel_axis=-1)
    return jnp.sum(lsq_quantize(pact_quantize(h, alpha, 4), step, 4, False) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 2, 3)))
  # step and alpha keep every value off the clip bounds: exactly at a bound the
  # gradient hinges on the last bit of x/step, which XLA may compute differently.
  args = (F32(0.13), F32(1.7))
  per_ex = jax.vmap(grad, in_axes=(None, 0, None, None))(w, x, *args)
  loop = [grad(w, x[i], *args) for i in range(x.shape[0])]
  for k in range(3):
    np.testing.assert_allclose(per_ex[k], np.stack([l[k] for l in loop]), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(per_ex[0]).sum()) > 0 and float(jnp.abs(per_ex[2]).sum()) > 0
  vm = jax.vmap(functools.partial(uniform_quantize, bits=4, signed=True))(x, jnp.full((5,), 0.2))
  np.testing.assert_array_equal(vm, uniform_quantize(x, 0.2, 4, True))
