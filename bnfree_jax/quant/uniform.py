"""Uniform fake-quantizers with a scale: calibrated (uniform), LSQ and PACT.

Each core is one ``jax.custom_jvp`` returning ``(codes, value)`` so that the
value's derivative (forward and reverse mode) is exactly the documented rule, and
a ``QTensor`` built from the same codes differentiates the same way
(``codes * scale``). Second derivatives follow the convention of ``ste``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bnfree_jax.quant.precision import in_float32
from bnfree_jax.quant.qtensor import QTensor, qrange
from bnfree_jax.quant.ste import _sign, const, masked, positive_scale, round_half_away


def sum_to_shape(g, shape):
  """Reduce a broadcast gradient back to ``shape`` (the shape of a scale)."""
  shape = tuple(shape)
  g = jnp.sum(g, axis=tuple(range(g.ndim - len(shape))))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


@jax.custom_jvp
def scale_grad(s, factor):
  """Identity forward; the derivative to ``s`` is multiplied by ``factor`` (LSQ's g)."""
  return s


@scale_grad.defjvp
def _scale_grad_jvp(primals, tangents):
  s, factor = primals
  return scale_grad(s, factor), tangents[0] * const(factor)


def _codes(v, qmin, qmax, use_sign):
  if use_sign:
    return _sign(v)
  return jnp.clip(round_half_away(v), qmin, qmax)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _fake_quant(x, s, qmin, qmax, use_sign):
  c = _codes(x / s, qmin, qmax, use_sign)
  return c, c * s


@_fake_quant.defjvp
def _fake_quant_jvp(qmin, qmax, use_sign, primals, tangents):
  x, s = primals
  tx, ts = tangents
  c, value = _fake_quant(x, s, qmin, qmax, use_sign)
  v = const(x / s)
  inside = const((v >= qmin) & (v <= qmax))   # x passes on the closed range
  strict = const((v > qmin) & (v < qmax))     # LSQ eq. 3: boundary counts as clipped
  s_, c_ = const(s), const(c)
  t_in = masked(inside, tx)
  t_value = t_in + jnp.where(strict, c_ - v, c_) * ts
  t_codes = t_in / s_ + masked(strict, -v / s_) * ts
  return (c, value), (t_codes, t_value)


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
  scale as a constant (``stop_gradient``) when it comes from calibration. A scale
  below ``SCALE_FLOOR`` (zero, negative) is raised to it.
  """
  scale = positive_scale(jnp.asarray(scale, jnp.result_type(x)))
  return _quantize(x, scale, bits, signed, as_qtensor)


def features_per_step(shape, step_shape, batch_axes=()) -> int:
  """Elements sharing one step in one sample: numel over the non-batch axes / numel(step)."""
  shape = tuple(shape)
  if batch_axes and not shape:
    raise ValueError(f"batch_axes {tuple(batch_axes)} given for a scalar input")
  batch = {a % len(shape) for a in batch_axes}
  per_sample = math.prod(d for i, d in enumerate(shape) if i not in batch)
  return max(1, per_sample // max(1, math.prod(step_shape)))


def lsq_default_grad_scale(x, step, bits: int, signed: bool, batch_axes=()) -> float:
  """LSQ's ``1/sqrt(N * Q_P)``, N the elements sharing one step in one sample.

  For weights (no batch axis) N is the layer's number of weights (per channel
  for a per-channel step), the paper's N_W. For activations, ``batch_axes``
  names the axes that index samples, so N is the paper's N_F, the features per
  sample (per channel for a per-channel step): the same at any batch size, and
  the same as a ``vmap``-ped per-sample call with ``batch_axes=()``.
  """
  n = features_per_step(jnp.shape(x), jnp.shape(step), batch_axes)
  return 1.0 / math.sqrt(n * qrange(bits, signed)[1])


@in_float32
def lsq_quantize(x, step, bits: int, signed: bool, grad_scale=None,
                 as_qtensor: bool = False, batch_axes=()):
  """Learned Step Size Quantization (Esser et al., ICLR 2020).

  Forward as ``uniform_quantize``. Gradient to step, per element:
  ``round(v) - v`` strictly inside ``(qmin, qmax)``, ``qmin`` at or below,
  ``qmax`` at or above (v = x/step), times ``grad_scale``, summed to step's
  shape. Gradient to x: g on ``[qmin, qmax]``, 0 outside. The default
  grad_scale is ``lsq_default_grad_scale(x, step, bits, signed, batch_axes)``.
  A step below ``SCALE_FLOOR`` is raised to it.
  """
  x = jnp.asarray(x)
  step = jnp.asarray(step, x.dtype)
  if grad_scale is None:
    grad_scale = lsq_default_grad_scale(x, step, bits, signed, batch_axes)
  s = scale_grad(positive_scale(step), jnp.asarray(grad_scale, step.dtype))
  return _quantize(x, s, bits, signed, as_qtensor)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _pact(x, alpha, qmax):
  scale = alpha / qmax
  c = jnp.clip(round_half_away(jnp.clip(x, 0, alpha) / scale), 0, qmax)
  return c, c * scale


@_pact.defjvp
def _pact_jvp(qmax, primals, tangents):
  x, alpha = primals
  tx, ta = tangents
  c, value = _pact(x, alpha, qmax)
  a_ = const(alpha)
  inside = const((x >= 0) & (x < alpha))
  above = const(x >= alpha)
  t_in = masked(inside, tx)
  t_value = t_in + masked(above, ta)
  # codes = y_q / scale with y_q ~ y (STE): d codes / d alpha = -codes/alpha below alpha.
  t_codes = t_in * (qmax / a_) + masked(~above, -const(c) / a_) * ta
  return (c, value), (t_codes, t_value)


@in_float32
def pact_quantize(x, alpha, bits: int, as_qtensor: bool = False):
  """PACT (Choi et al. 2018): clip to [0, alpha], quantize unsigned, scale alpha/(2^b-1).

  Gradient to x: g on ``[0, alpha)``, 0 outside. Gradient to alpha:
  ``sum(g * (x >= alpha))`` reduced to alpha's shape (scalar or per channel).
  An alpha below ``SCALE_FLOOR`` (zero, negative) is raised to it.
  """
  x = jnp.asarray(x)
  alpha = positive_scale(jnp.asarray(alpha, x.dtype))
  qmax = qrange(bits, False)[1]
  codes, value = _pact(x, alpha, qmax)
  if as_qtensor:
    return QTensor(codes, alpha / qmax, bits, False)
  return value
