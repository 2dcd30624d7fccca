"""Quantizer numerics: float32 arithmetic, LSQ's grad scale, forward mode, second
derivatives, degenerate scales, and the documented example's gradients."""
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax import quant

F32 = np.float32
# Values away from every clip bound and rounding tie for the scales used below.
XS = np.array([-2.3, -0.61, -0.17, 0.26, 0.43, 0.88, 1.37, 4.1], F32)


def elementwise(name):
  """(f(x, s), s0): each quantizer as a function of its input and its scale/alpha."""
  return {
      "sign_ste": (lambda x, s: quant.sign_ste(x * s), F32(1.0)),
      "approx_sign": (lambda x, s: quant.approx_sign(x * s), F32(1.0)),
      "round_ste": (lambda x, s: quant.round_ste(x / s), F32(0.3)),
      "clip_ste": (lambda x, s: quant.clip_ste(x, -s, s), F32(1.0)),
      "uniform": (lambda x, s: quant.uniform_quantize(x, s, 4, True), F32(0.3)),
      "lsq": (lambda x, s: quant.lsq_quantize(x, s, 3, True), F32(0.3)),
      "lsq_1bit": (lambda x, s: quant.lsq_quantize(x, s, 1, True), F32(0.3)),
      "pact": (lambda x, s: quant.pact_quantize(x, s, 4), F32(2.0)),
      "dorefa_act": (lambda x, s: quant.dorefa_activation(x / s, 3), F32(2.0)),
      "act_dorefa": (lambda x, s: quant.activation_quantizer("dorefa")(x, s, 3), F32(2.0)),
      "act_lsq": (lambda x, s: quant.activation_quantizer("lsq")(x[None], s, 3)[0], F32(2.0)),
      "w_maxabs": (lambda x, s: quant.maxabs_weight(x * s, 4)[0], F32(1.0)),
      "w_lsq": (lambda x, s: quant.weight_quantizer("lsq")(x, 4, None, step=s)[0], F32(0.3)),
      "w_sign": (lambda x, s: quant.weight_quantizer("sign")(x * s, 1)[0], F32(1.0)),
      "w_dorefa_tanh": (lambda x, s: quant.symmetric_weight(x * s, 4), F32(1.0)),
  }[name]


NAMES = ["sign_ste", "approx_sign", "round_ste", "clip_ste", "uniform", "lsq", "lsq_1bit",
         "pact", "dorefa_act", "act_dorefa", "act_lsq", "w_maxabs", "w_lsq", "w_sign",
         "w_dorefa_tanh"]
# Quantizers with no smooth part of their own (all but the tanh normalisation).
PURE = [n for n in NAMES if n != "w_dorefa_tanh"]
# Those whose second argument is the quantizer's own scale/alpha (not a product around it).
OWN_SCALE = ["clip_ste", "uniform", "lsq", "lsq_1bit", "pact", "act_lsq", "w_lsq"]


# ---------------------------------------------------------------- forward mode

@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_gives_the_same_first_derivatives_as_reverse_mode(name):
  f, s = elementwise(name)
  x = jnp.asarray(XS)
  for argnum in (0, 1):
    fwd = jax.jacfwd(f, argnums=argnum)(x, s)
    rev = jax.jacrev(f, argnums=argnum)(x, s)
    np.testing.assert_allclose(fwd, rev, rtol=1e-6, atol=1e-7)
  assert np.abs(jax.jacfwd(f)(x, s)).sum() > 0  # an STE, not a zero derivative
  u = jnp.linspace(-1.0, 2.0, x.size)
  _, t = jax.jvp(lambda x: f(x, s), (x,), (u,))
  np.testing.assert_allclose(t, jax.jacrev(f)(x, s) @ u, rtol=1e-5, atol=1e-6)


def test_forward_mode_rules_match_the_documented_formulas():
  x = jnp.asarray(XS)
  ones = jnp.ones_like(x)
  _, t = jax.jvp(quant.approx_sign, (x,), (ones,))
  a = np.abs(XS)
  np.testing.assert_allclose(t, np.where(a < 1, 2 - 2 * a, 0), rtol=1e-6)
  # PACT's alpha tangent is 1[x >= alpha]; LSQ's step tangent round(v) - v inside, the bound outside.
  _, t = jax.jvp(lambda a: quant.pact_quantize(x, a, 2), (F32(0.8),), (F32(1.0),))
  np.testing.assert_array_equal(t, (XS >= 0.8).astype(F32))
  _, t = jax.jvp(lambda s: quant.lsq_quantize(x, s, 3, True, grad_scale=1.0), (F32(0.3),), (F32(1.0),))
  v = XS / F32(0.3)
  want = np.where(v <= -3, -3, np.where(v >= 3, 3, np.sign(v) * np.floor(np.abs(v) + 0.5) - v))
  np.testing.assert_allclose(t, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- second derivatives

@pytest.mark.parametrize("name", PURE)
def test_second_derivative_convention_quantizer_is_linear_to_second_order(name):
  # Convention: a rule's coefficients are constants, so the Hessian of
  # 0.5 * |f|^2 through the quantizer is J^T J (Gauss-Newton exactly) and the
  # quantizer's own second derivative is 0: in x, and in its scale/alpha too
  # where the scale is the quantizer's own argument (not a product around it).
  f, s = elementwise(name)
  x = jnp.asarray(XS)
  if name in OWN_SCALE:
    p, g = jnp.concatenate([x, jnp.atleast_1d(s)]), lambda p: f(p[:-1], p[-1])
  else:
    p, g = x, lambda x: f(x, s)
  hess = jax.hessian(lambda p: 0.5 * jnp.sum(g(p) ** 2))(p)
  jac = jax.jacrev(g)(p)
  assert np.abs(jac).sum() > 0
  np.testing.assert_allclose(hess, jac.T @ jac, rtol=1e-5, atol=1e-5)
  r = jnp.asarray(np.random.default_rng(0).normal(size=XS.shape).astype(F32))
  np.testing.assert_array_equal(jax.hessian(lambda p: jnp.sum(r * g(p)))(p), 0)


def test_tanh_normalisation_keeps_its_own_second_derivative():
  # Around the estimator, smooth parts differentiate as usual: not linear.
  f = lambda w: jnp.sum(quant.symmetric_weight(w, 4) * jnp.arange(8.0))
  assert np.abs(jax.hessian(f)(jnp.asarray(XS))).max() > 1e-3


# ---------------------------------------------------------------- float32 arithmetic

def bf16_round_trip(fn, x, *rest):
  """(value, grad) of fn on bf16 x, and of fn on float32 x cast back to bf16."""
  xb = jnp.asarray(x, jnp.bfloat16)
  xf = xb.astype(jnp.float32)
  gb = jnp.asarray(np.linspace(0.5, 1.5, np.size(x)).reshape(np.shape(x)), jnp.bfloat16)
  yb, pull_b = jax.vjp(lambda x: fn(x, *rest), xb)
  yf, pull_f = jax.vjp(lambda x: fn(x, *rest), xf)
  return (yb, pull_b(gb)[0]), (yf.astype(jnp.bfloat16), pull_f(gb.astype(jnp.float32))[0].astype(jnp.bfloat16))


def test_approx_sign_rule_is_computed_in_float32_for_bf16_inputs():
  x = np.random.default_rng(3).uniform(-1, 1, 512).astype(F32)
  (yb, gb), (yf, gf) = bf16_round_trip(quant.approx_sign, x)
  assert yb.dtype == gb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(yb, yf)
  np.testing.assert_array_equal(np.asarray(gb, F32), np.asarray(gf, F32))


@pytest.mark.parametrize("kind,name", [("weight", n) for n in quant.weight_quantizers()]
                         + [("activation", n) for n in quant.activation_quantizers()])
def test_every_registered_quantizer_computes_in_float32(kind, name):
  fn = getattr(quant, f"{kind}_quantizer")(name)
  x = np.random.default_rng(4).normal(0.5, 1.0, (4, 64)).astype(F32)
  for bits in ((1,) if "sign" in name else (1, 4, 8)):
    args = (bits, None) if kind == "weight" else (F32(1.7), bits)
    first = (lambda x, *a: fn(x, *a)[0]) if kind == "weight" else fn
    (yb, gb), (yf, gf) = bf16_round_trip(first, x, *args)
    np.testing.assert_array_equal(np.asarray(yb, F32), np.asarray(yf, F32))
    np.testing.assert_array_equal(np.asarray(gb, F32), np.asarray(gf, F32))


# ---------------------------------------------------------------- LSQ grad scale

def lsq_act_step_grad(x, alpha, bits=4, **kw):
  per_sample = np.linspace(0.5, 1.5, x[0].size).reshape(x.shape[1:]).astype(F32)
  g = np.broadcast_to(per_sample, x.shape)
  return jax.grad(lambda a: jnp.sum(jnp.asarray(g) * quant.activation_quantizer("lsq")(
      jnp.asarray(x), a, bits, **kw)))(alpha)


def test_lsq_activation_grad_scale_counts_features_per_sample_not_the_batch():
  x = np.random.default_rng(5).uniform(0, 3, (2, 3, 3, 4)).astype(F32)
  n_f, qp = 3 * 3 * 4, 15
  assert quant.lsq_default_grad_scale(x, F32(0.1), 4, False, batch_axes=(0,)) == \
      pytest.approx(1 / math.sqrt(n_f * qp))
  assert quant.lsq_default_grad_scale(x, np.ones((4,), F32), 4, False, batch_axes=(0,)) == \
      pytest.approx(1 / math.sqrt(9 * qp))  # per channel: the features of one channel
  # Per sample, the step gradient is the same at batch 2 and at batch 8 (x tiled).
  alpha = F32(2.0)
  g2 = lsq_act_step_grad(np.tile(x[:1], (2, 1, 1, 1)), alpha)
  g8 = lsq_act_step_grad(np.tile(x[:1], (8, 1, 1, 1)), alpha)
  np.testing.assert_allclose(g8 / 8, g2 / 2, rtol=1e-5)
  assert abs(float(g2)) > 1e-3


def test_lsq_activation_grad_scale_is_the_same_under_vmap():
  x = np.random.default_rng(6).uniform(0, 3, (5, 4, 3)).astype(F32)
  lsq = quant.activation_quantizer("lsq")

  def batched(a):
    return jnp.sum(lsq(jnp.asarray(x), a, 3) ** 2)

  def mapped(a):
    return jnp.sum(jax.vmap(lambda xi: lsq(xi, a, 3, batch_axes=()))(jnp.asarray(x)) ** 2)

  for alpha in (F32(2.0), np.full((3,), 2.0, F32)):
    gb, gm = jax.grad(batched)(alpha), jax.grad(mapped)(alpha)
    assert np.all(np.abs(gb) > 1e-3)
    np.testing.assert_allclose(gm, gb, rtol=1e-5)


def test_lsq_weight_grad_scale_is_the_layers_weights_per_step():
  w = np.random.default_rng(7).normal(0, 0.3, (3, 3, 2, 4)).astype(F32)
  assert quant.lsq_default_grad_scale(w, F32(0.1), 4, True) == pytest.approx(1 / math.sqrt(72 * 7))
  assert quant.lsq_default_grad_scale(w, np.ones((1, 1, 1, 4), F32), 4, True) == \
      pytest.approx(1 / math.sqrt(18 * 7))
  with pytest.raises(ValueError, match="batch_axes .* scalar input"):
    quant.lsq_default_grad_scale(F32(1.0), F32(0.1), 4, True, batch_axes=(0,))


# ---------------------------------------------------------------- degenerate scales

@pytest.mark.parametrize("name", ["uniform", "lsq", "pact", "act_dorefa", "act_lsq", "w_lsq"])
@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_zero_or_negative_scale_is_raised_to_the_floor_never_nan(name, bad):
  f, _ = elementwise(name)
  x = jnp.asarray(XS)
  y = f(x, F32(bad))
  gx, gs = jax.grad(lambda x, s: jnp.sum(f(x, s)), argnums=(0, 1))(x, F32(bad))
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(gx)) and np.isfinite(gs)
  assert float(gs) != 0  # the floor passes the gradient: a learned scale can come back
  np.testing.assert_array_equal(y, f(x, F32(quant.SCALE_FLOOR)))


def test_positive_scale_is_max_with_the_floor_and_passes_its_gradient():
  s = jnp.array([-2.0, 0.0, 1e-9, 0.5], jnp.float32)
  np.testing.assert_array_equal(quant.positive_scale(s), np.array([1e-8, 1e-8, 1e-8, 0.5], F32))
  np.testing.assert_array_equal(jax.grad(lambda s: jnp.sum(quant.positive_scale(s) * 3))(s), 3)


# ---------------------------------------------------------------- the documented example

def test_documented_gradient_example_has_non_zero_gradients():
  doc = pathlib.Path(__file__).parent.parent / "docs" / "quantizers.md"
  text = doc.read_text()
  code = re.search(r"## Example: the gradient.*?```python\n(.*?)```", text, re.S).group(1)
  scope = {"print": lambda *a: None}
  exec(compile(code, str(doc), "exec"), scope)
  grads = scope["grads"]
  assert float(jnp.abs(grads["w"]).sum()) > 0 and float(grads["alpha"]) != 0
  clipped = jnp.mean(scope["layer"](scope["params"], scope["x"]) == grads["alpha"] * 0 + 2.0)
  assert float(clipped) < 0.5  # most outputs are not clipped at alpha
