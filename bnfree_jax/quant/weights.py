"""Weight and activation quantizers of DoReFa-Net, and the project's weight quantizer.

``dorefa_weight`` is DoReFa-Net (Zhou et al. 2016) as published: its k-bit grid
``{(2c - n)/n}`` (n = 2^k - 1) has odd integer codes, so it needs a zero-point
or a (k+1)-bit container. ``symmetric_weight`` keeps DoReFa's tanh
normalisation but lands on the narrow symmetric k-bit grid, zero-point 0, that
the integer artifact requires.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bnfree_jax.quant.precision import in_float32
from bnfree_jax.quant.qtensor import QTensor, qrange
from bnfree_jax.quant.ste import SCALE_FLOOR, _binarize, clip_ste, round_ste, sign_ste
from bnfree_jax.quant.uniform import uniform_quantize


def _reduce_axes(ndim: int, channel_axis):
  """Axes to reduce for one statistic per tensor (None) or per channel."""
  if channel_axis is None:
    return tuple(range(ndim))
  ch = channel_axis % ndim
  return tuple(a for a in range(ndim) if a != ch)


def _safe_max_abs(t, axes):
  m = jnp.max(jnp.abs(t), axis=axes, keepdims=True)
  return jnp.maximum(m, jnp.finfo(t.dtype).tiny)  # all-zero tensors stay 0


def _binary(w, axes, as_qtensor):
  """sign(w) * mean|w| with DoReFa's backward (identity; the mean is a constant)."""
  mean_abs = jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axes, keepdims=True))
  codes, value = _binarize(w, mean_abs)
  return QTensor(codes, mean_abs, 1, True) if as_qtensor else value


@in_float32
def dorefa_weight(w, bits: int, as_qtensor: bool = False):
  """DoReFa-Net weights. bits=1: ``sign(w) * mean|w|``, gradient identity.

  bits>=2: ``2 * quantize_k(tanh(w) / (2 max|tanh w|) + 0.5) - 1`` with
  ``quantize_k(r) = round(n r)/n``, n = 2^k - 1, computed as ``(2c - n) * (1/n)``
  so the QTensor (codes ``2c - n``, scale ``1/n``, a (k+1)-bit signed container)
  dequantizes to exactly the same value. Gradients: straight through the round,
  through tanh and the max as autodiff gives.
  """
  w = jnp.asarray(w)
  if bits == 1:
    return _binary(w, tuple(range(w.ndim)), as_qtensor)
  n = 2 ** bits - 1
  t = jnp.tanh(w)
  r = t / (2 * _safe_max_abs(t, None)) + 0.5
  codes = 2 * round_ste(n * r) - n
  scale = jnp.asarray(1.0 / n, w.dtype)
  return QTensor(codes, scale, bits + 1, True) if as_qtensor else codes * scale


@in_float32
def dorefa_activation(x, bits: int, as_qtensor: bool = False):
  """DoReFa-Net activations: ``quantize_k(clip(x, 0, 1))``, codes ``[0, 2^k-1]``.

  Gradient: g on the closed range [0, 1] (straight through the round), 0 outside.
  """
  x = jnp.asarray(x)
  n = 2 ** bits - 1
  codes = round_ste(n * clip_ste(x, jnp.zeros((), x.dtype), jnp.ones((), x.dtype)))
  scale = jnp.asarray(1.0 / n, x.dtype)
  return QTensor(codes, scale, bits, False) if as_qtensor else codes * scale


@in_float32
def symmetric_weight(w, bits: int, channel_axis=None, as_qtensor: bool = False):
  """The project's weight quantizer: narrow symmetric grid, zero-point 0.

  bits>=2: ``w_t = tanh(w) / max|tanh(w)|`` (max per tensor, or per slice along
  ``channel_axis``, e.g. -1 for HWIO / [in, out] kernels), codes
  ``round(w_t * qmax)`` in ``[-qmax, qmax]``, scale ``1/qmax`` (an array of one
  entry per channel, broadcastable, when ``channel_axis`` is given, so a
  per-channel factor can later be folded into it). bits=1: codes ``sign(w)``,
  scale ``mean|w|`` per tensor or per channel, DoReFa's identity backward.
  """
  w = jnp.asarray(w)
  axes = _reduce_axes(w.ndim, channel_axis)
  if bits == 1:
    return _binary(w, axes, as_qtensor)
  qmax = qrange(bits, True)[1]
  t = jnp.tanh(w)
  m = _safe_max_abs(t, axes)
  codes = round_ste(t / m * qmax)
  if channel_axis is None:
    scale = jnp.asarray(1.0 / qmax, w.dtype)
  else:
    scale = jnp.full(m.shape, 1.0 / qmax, w.dtype)
  return QTensor(codes, scale, bits, True) if as_qtensor else codes * scale


def binary_scale(w, axis=None):
  """mean|w| per tensor (a scalar) or per slice along ``axis`` (keepdims), a constant."""
  axes = _reduce_axes(w.ndim, axis)
  s = jnp.mean(jnp.abs(w), axis=axes, keepdims=axis is not None)
  return jax.lax.stop_gradient(jnp.maximum(s, SCALE_FLOOR))


def maxabs_scale(w, bits: int, axis=None):
  """The student's weight scale: max|w|/qmax (b >= 2) or mean|w| (b = 1), a constant.

  Per tensor (a scalar) or per slice along ``axis`` (keepdims); floored at
  ``SCALE_FLOOR`` so an all-zero tensor never divides by 0.
  """
  if bits == 1:
    return binary_scale(w, axis)
  s = jnp.max(jnp.abs(w), axis=_reduce_axes(w.ndim, axis), keepdims=axis is not None)
  return jax.lax.stop_gradient(jnp.maximum(s / qrange(bits, True)[1], SCALE_FLOOR))


@in_float32
def maxabs_weight(w, bits: int, axis=None):
  """(w_q, scale): symmetric max-abs fake-quant on the narrow grid, the student's rule.

  Scale-equivariant (Q(k w) = k Q(w), k > 0), which is what makes folding BN
  into the student exact. bits=1: ``sign_ste(w) * mean|w|``; bits>=2:
  ``uniform_quantize(w, max|w|/qmax)``, the scale a constant of differentiation.
  """
  w = jnp.asarray(w)
  scale = maxabs_scale(w, bits, axis)
  if bits == 1:
    return sign_ste(w) * scale, scale
  return uniform_quantize(w, scale, bits, signed=True), scale
