"""Straight-through estimators: the elementwise building blocks of every quantizer.

Each is a ``jax.custom_jvp`` whose tangent rule is the estimator: reverse mode
(``grad``, ``vjp``) transposes that rule, forward mode (``jvp``, ``jacfwd``)
applies it, so both see the same first derivatives, and the rule is part of the
quantizer's contract, testable on its own (DESIGN: "the gradient is part of the
quantizer's contract").

Second derivatives, one convention for every quantizer: the coefficients of a
rule (the masks, Bi-Real's ``2 - 2|x|``, LSQ's ``round(v) - v``, a grad scale)
are constants of differentiation (``stop_gradient``), and the primal inside a
rule is the estimator itself, so a quantizer acts on second order as the linear
map its first derivative gives: its own second derivative is 0, and
``jax.hessian`` of a loss through it is that of the surrogate linear map.
Smooth parts around an estimator (DoReFa's tanh, a max) differentiate as usual.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bnfree_jax.quant.precision import in_float32

# The smallest scale or clip level a quantizer uses: a zero or negative one is
# raised to it (forward), never divided by. The student's max-abs scale floors at it too.
SCALE_FLOOR = 1e-8

const = jax.lax.stop_gradient  # a rule's coefficient: no derivative of its own


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


def masked(cond, t):
  """``t`` where ``cond``, an exact +0 elsewhere (the tangent of a clipped value)."""
  return jnp.where(cond, t, jnp.zeros_like(t))


@jax.custom_jvp
def _round_ste(x):
  return round_half_away(x)


_round_ste.defjvp(lambda p, t: (_round_ste(p[0]), t[0]))


@in_float32
def round_ste(x):
  """Round half away from zero; derivative: identity (straight through)."""
  return _round_ste(x)


@jax.custom_jvp
def _sign_ste(x):
  return _sign(x)


@_sign_ste.defjvp
def _sign_ste_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return _sign_ste(x), masked(const(jnp.abs(x) <= 1), t)


@in_float32
def sign_ste(x):
  """Sign (+1 for x >= 0, -1 otherwise); derivative ``1[|x| <= 1]`` (BinaryNet)."""
  return _sign_ste(x)


@jax.custom_jvp
def _approx_sign(x):
  return _sign(x)


@_approx_sign.defjvp
def _approx_sign_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  a = const(jnp.abs(x))
  # masked first, then the factor: its transpose is where(a < 1, g * (2 - 2a), +0).
  return _approx_sign(x), masked(a < 1, t) * (2 - 2 * a)


@in_float32
def approx_sign(x):
  """Sign forward; derivative ``2 - 2|x|`` for |x| < 1, else 0 (Bi-Real Net)."""
  return _approx_sign(x)


@jax.custom_jvp
def _clip_ste(x, lo, hi):
  return jnp.clip(x, lo, hi)


@_clip_ste.defjvp
def _clip_ste_jvp(primals, tangents):
  x, lo, hi = primals
  inside = const((x >= lo) & (x <= hi))
  return _clip_ste(x, lo, hi), masked(inside, tangents[0])


@in_float32
def clip_ste(x, lo, hi):
  """clip(x, lo, hi) whose derivative is 1 on the closed range [lo, hi], 0 outside.

  ``jnp.clip`` splits the gradient 0.5/0.5 exactly at a bound; quantizers need
  a documented value there. ``lo`` and ``hi`` get no gradient.
  """
  return _clip_ste(x, lo, hi)


@jax.custom_jvp
def _floor_ste(s):
  return jnp.maximum(s, SCALE_FLOOR)


_floor_ste.defjvp(lambda p, t: (_floor_ste(p[0]), t[0]))


def positive_scale(s):
  """``max(s, SCALE_FLOOR)``: a zero or negative scale/alpha never divides.

  The derivative passes straight through, so a learned scale or clip level
  pushed below the floor still gets its gradient and can come back.
  """
  return _floor_ste(jnp.asarray(s))


@jax.custom_jvp
def _binarize(w, mean_abs):
  """(codes, value) = (sign(w), sign(w) * mean_abs); value's derivative is identity.

  DoReFa-Net's 1-bit weights: the scale E|w| is a constant of differentiation
  and the sign passes gradients straight through, unclipped. ``codes``' own
  derivative is 1 / mean_abs, so ``codes * mean_abs`` differentiates the same way.
  """
  c = _sign(w)
  return c, c * mean_abs


@_binarize.defjvp
def _binarize_jvp(primals, tangents):
  w, mean_abs = primals
  tw = tangents[0]
  return _binarize(w, mean_abs), (tw / const(mean_abs), tw)
