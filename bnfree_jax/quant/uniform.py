"""Uniform fake-quantizers with a scale: calibrated (uniform), LSQ and PACT.

Each core is one ``jax.custom_vjp`` returning ``(codes, value)`` so that the
value's gradient is exactly the documented rule, and a ``QTensor`` built from
the same codes differentiates the same way (``codes * scale``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bnfree_jax.quant.precision import in_float32
from bnfree_jax.quant.qtensor import QTensor, qrange
from bnfree_jax.quant.ste import _sign, round_half_away


def sum_to_shape(g, shape):
  """Reduce a broadcast gradient back to ``shape`` (the shape of a scale)."""
  shape = tuple(shape)
  g = jnp.sum(g, axis=tuple(range(g.ndim - len(shape))))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


@jax.custom_vjp
def scale_grad(s, factor):
  """Identity forward; backward multiplies the gradient by ``factor`` (LSQ's g)."""
  return s


scale_grad.defvjp(lambda s, f: (s, f),
                  lambda f, g: (g * f, jnp.zeros_like(f)))


def _codes(v, qmin, qmax, use_sign):
  if use_sign:
    return _sign(v)
  return jnp.clip(round_half_away(v), qmin, qmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fake_quant(x, s, qmin, qmax, use_sign):
  c = _codes(x / s, qmin, qmax, use_sign)
  return c, c * s


def _fake_quant_fwd(x, s, qmin, qmax, use_sign):
  c = _codes(x / s, qmin, qmax, use_sign)
  return (c, c * s), (x, s, c)


def _fake_quant_bwd(qmin, qmax, use_sign, res, gs):
  x, s, c = res
  g_c, g_v = gs
  v = x / s
  inside = (v >= qmin) & (v <= qmax)          # x passes on the closed range
  strict = (v > qmin) & (v < qmax)            # LSQ eq. 3: boundary counts as clipped
  zero = jnp.zeros_like(g_v)
  gx = jnp.where(inside, g_v + g_c / s, zero)
  gs_el = (g_v * jnp.where(strict, c - v, c)
           + g_c * jnp.where(strict, -v / s, zero))
  return sum_to_shape(gx, jnp.shape(x)), sum_to_shape(gs_el, jnp.shape(s))


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _quantize(x, s, bits, signed, as_qtensor):
  x = jnp.asarray(x)
  qmin, qmax = qrange(bits, signed)
  codes, value = _fake_quant(x, s, qmin, qmax, bool(signed and bits == 1))
  return QTensor(codes, s, bits, signed) if as_qtensor else value


@in_float32
def uniform_quantize(x, scale, bits: int, signed: bool, as_qtensor: bool = False):
  """Fake-quant ``clip(round(x/scale), qmin, qmax) * scale`` (1-bit signed: sign).

  Gradient to x: g where ``qmin <= x/scale <= qmax``, 0 outside. Gradient to
  scale: the straight-through one (LSQ's formula with grad_scale 1); treat the
  scale as a constant (``stop_gradient``) when it comes from calibration.
  """
  return _quantize(x, jnp.asarray(scale, jnp.result_type(x)), bits, signed,
                   as_qtensor)


def lsq_default_grad_scale(x, step, bits: int, signed: bool) -> float:
  """LSQ's ``1/sqrt(N * Q_P)``, N the number of elements sharing one step.

  For a scalar step N = numel(x), as in the paper; for a per-channel step N is
  the numel of one channel, so each channel's step sees the same gradient scale.
  """
  n = max(1, math.prod(jnp.shape(x)) // max(1, math.prod(jnp.shape(step))))
  return 1.0 / math.sqrt(n * qrange(bits, signed)[1])


@in_float32
def lsq_quantize(x, step, bits: int, signed: bool, grad_scale=None,
                 as_qtensor: bool = False):
  """Learned Step Size Quantization (Esser et al., ICLR 2020).

  Forward as ``uniform_quantize``. Gradient to step, per element:
  ``round(v) - v`` strictly inside ``(qmin, qmax)``, ``qmin`` at or below,
  ``qmax`` at or above (v = x/step), times ``grad_scale``, summed to step's
  shape. Gradient to x: g on ``[qmin, qmax]``, 0 outside.
  """
  x = jnp.asarray(x)
  step = jnp.asarray(step, x.dtype)
  if grad_scale is None:
    grad_scale = lsq_default_grad_scale(x, step, bits, signed)
  s = scale_grad(step, jnp.asarray(grad_scale, step.dtype))
  return _quantize(x, s, bits, signed, as_qtensor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pact(x, alpha, qmax):
  scale = alpha / qmax
  c = jnp.clip(round_half_away(jnp.clip(x, 0, alpha) / scale), 0, qmax)
  return c, c * scale


def _pact_fwd(x, alpha, qmax):
  out = _pact(x, alpha, qmax)
  return out, (x, alpha, out[0])


def _pact_bwd(qmax, res, gs):
  x, alpha, c = res
  g_c, g_v = gs
  zero = jnp.zeros_like(g_v)
  inside = (x >= 0) & (x < alpha)
  above = x >= alpha
  gx = jnp.where(inside, g_v + g_c * (qmax / alpha), zero)
  # codes = y_q / scale with y_q ~ y (STE): d codes / d alpha = -codes/alpha inside.
  ga = jnp.where(above, g_v, zero) + g_c * jnp.where(above, zero, -c / alpha)
  return sum_to_shape(gx, jnp.shape(x)), sum_to_shape(ga, jnp.shape(alpha))


_pact.defvjp(_pact_fwd, _pact_bwd)


@in_float32
def pact_quantize(x, alpha, bits: int, as_qtensor: bool = False):
  """PACT (Choi et al. 2018): clip to [0, alpha], quantize unsigned, scale alpha/(2^b-1).

  Gradient to x: g on ``[0, alpha)``, 0 outside. Gradient to alpha:
  ``sum(g * (x >= alpha))`` reduced to alpha's shape (scalar or per channel).
  """
  x = jnp.asarray(x)
  alpha = jnp.asarray(alpha, x.dtype)
  qmax = qrange(bits, False)[1]
  codes, value = _pact(x, alpha, qmax)
  if as_qtensor:
    return QTensor(codes, alpha / qmax, bits, False)
  return value
