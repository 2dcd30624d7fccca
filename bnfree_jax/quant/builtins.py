"""The built-in quantizers, registered under the contract of ``registry``.

Thin adapters: each calls an existing quantizer and reshapes its arguments and
result to the contract's signature, without changing that quantizer. Every one
runs in float32 whatever the input dtype (``in_float32``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bnfree_jax.quant.precision import in_float32
from bnfree_jax.quant.qtensor import qrange
from bnfree_jax.quant.registry import (register_activation_quantizer,
                                       register_weight_quantizer)
from bnfree_jax.quant.ste import approx_sign, positive_scale, sign_ste
from bnfree_jax.quant.uniform import lsq_quantize, pact_quantize
from bnfree_jax.quant.weights import (_reduce_axes, binary_scale, dorefa_activation,
                                      maxabs_weight, symmetric_weight)

register_weight_quantizer("maxabs")(maxabs_weight)


@register_weight_quantizer("dorefa_tanh")
@in_float32
def dorefa_tanh_weight(w, bits: int, axis=None):
  """``symmetric_weight`` (DoReFa's tanh normalisation on the narrow grid) as (w_q, scale)."""
  qt = symmetric_weight(w, bits, channel_axis=axis, as_qtensor=True)
  return qt.dequantize(), qt.scale


def lsq_init_step(w, bits: int, axis=None):
  """LSQ's initial step ``2 mean|w| / sqrt(Q_P)`` per tensor or per channel, a constant."""
  qmax = qrange(bits, True)[1]
  m = jnp.mean(jnp.abs(w), axis=_reduce_axes(w.ndim, axis), keepdims=axis is not None)
  return jax.lax.stop_gradient(2 * m / jnp.sqrt(jnp.asarray(qmax, w.dtype)))


@register_weight_quantizer("lsq")
@in_float32
def lsq_weight(w, bits: int, axis=None, step=None):
  """LSQ weights: ``lsq_quantize(w, step)``, N = the layer's weights per step.

  A layer that learns its step passes it as ``step`` (scalar, or keepdims per
  channel along ``axis``); without it the step is LSQ's initialisation from w,
  a constant of differentiation.
  """
  w = jnp.asarray(w)
  step = lsq_init_step(w, bits, axis) if step is None else jnp.asarray(step, w.dtype)
  step = positive_scale(step)
  return lsq_quantize(w, step, bits, signed=True), step


def _binary_weight(ste, w, bits: int, axis=None):
  """``ste(w) * mean|w|``: a sign weight quantizer, refused at any other width."""
  if bits != 1:
    raise ValueError(f"the {ste.__name__} weight quantizer is binary: bits must be 1, got {bits}")
  w = jnp.asarray(w)
  scale = binary_scale(w, axis)
  return ste(w) * scale, scale


@register_weight_quantizer("sign")
@in_float32
def sign_weight(w, bits: int, axis=None):
  """BinaryNet: ``sign_ste(w) * mean|w|`` (derivative 1[|w| <= 1]); 1 bit only."""
  return _binary_weight(sign_ste, w, bits, axis)


@register_weight_quantizer("approx_sign")
@in_float32
def approx_sign_weight(w, bits: int, axis=None):
  """Bi-Real: ``approx_sign(w) * mean|w|`` (derivative 2 - 2|w| on |w| < 1); 1 bit only."""
  return _binary_weight(approx_sign, w, bits, axis)


def sign_at_one_bit(fn):
  """An activation quantizer that is Bi-Real's ``approx_sign`` at 1 bit (alpha unused)."""

  @functools.wraps(fn)
  def wrapped(x, alpha, bits: int, **kwargs):
    return approx_sign(x) if bits == 1 else fn(x, alpha, bits, **kwargs)

  return wrapped


@register_activation_quantizer("pact")
@sign_at_one_bit
def pact_activation(x, alpha, bits: int):
  """``pact_quantize`` under the contract."""
  return pact_quantize(x, alpha, bits)


@register_activation_quantizer("dorefa")
@sign_at_one_bit
@in_float32
def dorefa_activation_scaled(x, alpha, bits: int):
  """DoReFa's ``quantize_k(clip(x/alpha, 0, 1))`` on the step ``alpha/(2^b - 1)``.

  With alpha = 1 it is ``dorefa_activation``; alpha's gradient is autodiff
  through the adapter: ``codes/n - (x/alpha) 1[0 <= x/alpha <= 1]``.
  """
  alpha = positive_scale(jnp.asarray(alpha, jnp.result_type(x)))
  n = qrange(bits, False)[1]
  return dorefa_activation(x / alpha, bits, as_qtensor=True).codes * (alpha / n)


@register_activation_quantizer("lsq")
@sign_at_one_bit
@in_float32
def lsq_activation(x, alpha, bits: int, batch_axes=(0,)):
  """LSQ activations on the step ``alpha/(2^b - 1)``, N = features per sample.

  ``batch_axes`` are x's sample axes (the leading one by default); a function
  ``vmap``-ped over the batch sees one sample and passes ``batch_axes=()``.
  """
  alpha = positive_scale(jnp.asarray(alpha, jnp.result_type(x)))
  return lsq_quantize(x, alpha / qrange(bits, False)[1], bits, signed=False,
                      batch_axes=batch_axes)
