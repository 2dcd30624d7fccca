"""Straight-through estimators: the elementwise building blocks of every quantizer.

Each is a ``jax.custom_vjp`` so that its backward rule is part of its contract
and can be tested on its own (DESIGN: "the gradient is part of the quantizer's
contract").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def round_half_away(x):
  """Round half away from zero, exactly: the project's single rounding rule.

  ``floor(|x| + 0.5)`` is wrong for the float just below 0.5 (the sum rounds up
  to 1.0); splitting off the integer part is exact in floating point.
  """
  t = jnp.trunc(x)
  frac = x - t  # exact: |frac| < 1 and shares x's exponent range
  return t + jnp.where(jnp.abs(frac) >= 0.5, jnp.sign(x), jnp.zeros_like(x))


def _sign(x):
  """+1 where x >= 0, else -1 (never 0), in x's dtype."""
  return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


@jax.custom_vjp
def round_ste(x):
  """Round half away from zero; backward: identity (straight through)."""
  return round_half_away(x)


round_ste.defvjp(lambda x: (round_half_away(x), None), lambda _, g: (g,))


@jax.custom_vjp
def sign_ste(x):
  """Sign (+1 for x >= 0, -1 otherwise); backward g * (|x| <= 1) (BinaryNet)."""
  return _sign(x)


def _sign_ste_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


sign_ste.defvjp(lambda x: (_sign(x), x), _sign_ste_bwd)


@jax.custom_vjp
def approx_sign(x):
  """Sign forward; backward g * (2 - 2|x|) for |x| < 1, else 0 (Bi-Real Net)."""
  return _sign(x)


def _approx_sign_bwd(x, g):
  a = jnp.abs(x)
  return (jnp.where(a < 1, g * (2 - 2 * a), jnp.zeros_like(g)),)


approx_sign.defvjp(lambda x: (_sign(x), x), _approx_sign_bwd)


@jax.custom_vjp
def clip_ste(x, lo, hi):
  """clip(x, lo, hi) whose gradient is g on the closed range [lo, hi], 0 outside.

  ``jnp.clip`` splits the gradient 0.5/0.5 exactly at a bound; quantizers need
  a documented value there. ``lo`` and ``hi`` get no gradient.
  """
  return jnp.clip(x, lo, hi)


def _clip_fwd(x, lo, hi):
  return jnp.clip(x, lo, hi), (x, lo, hi)


def _clip_bwd(res, g):
  x, lo, hi = res
  inside = (x >= lo) & (x <= hi)
  return (jnp.where(inside, g, jnp.zeros_like(g)),
          jnp.zeros_like(lo), jnp.zeros_like(hi))


clip_ste.defvjp(_clip_fwd, _clip_bwd)


@jax.custom_vjp
def _binarize(w, mean_abs):
  """(codes, value) = (sign(w), sign(w) * mean_abs); value's gradient is identity.

  DoReFa-Net's 1-bit weights: the scale E|w| is a constant of the backward pass
  and the sign passes gradients straight through, unclipped. ``codes``' own
  gradient is g / mean_abs, so ``codes * mean_abs`` differentiates the same way.
  """
  c = _sign(w)
  return c, c * mean_abs


def _binarize_fwd(w, mean_abs):
  c = _sign(w)
  return (c, c * mean_abs), mean_abs


def _binarize_bwd(mean_abs, gs):
  g_codes, g_value = gs
  return g_value + g_codes / mean_abs, jnp.zeros_like(mean_abs)


_binarize.defvjp(_binarize_fwd, _binarize_bwd)
