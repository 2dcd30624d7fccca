"""Quantizers by name: the registry and the contract every entry honours.

A quantizer is free in its backward pass and in how it learns its scale; its
forward must land on the integer grid (DESIGN.md), so that export stays exact:

* weight quantizer ``fn(w, bits, axis) -> (w_q, scale)``: ``axis`` None (one
  scale per tensor) or the output-channel axis (one scale per channel);
  ``w_q / scale`` integers in the narrow signed range, ``{-1, +1}`` at 1 bit;
* activation quantizer ``fn(x, alpha, bits) -> y``: ``y = step * codes``,
  ``step = alpha / (2^bits - 1)``, codes integers in ``[0, 2^bits - 1]``;
  at 1 bit ``y = codes`` in ``{-1, +1}`` (a sign; alpha unused).

``check_on_grid`` verifies a forward output against this contract.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from bnfree_jax.quant.qtensor import QTensor, qrange

KINDS = ("weight", "activation")
_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
GRID_TOL = 1e-3  # |value/step - code| allowed: float32 rounding of code * step, not a step


def _table(kind: str) -> dict[str, Callable]:
  if kind not in _REGISTRY:
    raise ValueError(f"unknown quantizer kind {kind!r}; use one of {KINDS}")
  return _REGISTRY[kind]


def _register(kind: str, name: str):
  """Decorator adding ``fn`` to the ``kind`` table as ``name``; returns fn unchanged."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"a {kind} quantizer's name must be a non-empty string, got {name!r}")
  table = _table(kind)

  def deco(fn):
    old = table.get(name)
    if old is not None and old is not fn:
      raise ValueError(f"{kind} quantizer {name!r} is already registered "
                       f"({old.__module__}.{old.__qualname__}); choose another name")
    table[name] = fn
    return fn

  return deco


def register_weight_quantizer(name: str):
  """Register ``fn(w, bits, axis) -> (w_q, scale)`` as weight quantizer ``name``."""
  return _register("weight", name)


def register_activation_quantizer(name: str):
  """Register ``fn(x, alpha, bits) -> y`` as activation quantizer ``name``."""
  return _register("activation", name)


def lookup(kind: str, name: str) -> Callable:
  """The ``kind`` quantizer registered as ``name``; unknown names fail naming the known ones."""
  table = _table(kind)
  if name not in table:
    raise ValueError(f"unknown {kind} quantizer {name!r}; known: {', '.join(sorted(table))}")
  return table[name]


def weight_quantizer(name: str) -> Callable:
  """The weight quantizer registered as ``name``."""
  return lookup("weight", name)


def activation_quantizer(name: str) -> Callable:
  """The activation quantizer registered as ``name``."""
  return lookup("activation", name)


def weight_quantizers() -> tuple[str, ...]:
  """Names of the registered weight quantizers, sorted."""
  return tuple(sorted(_table("weight")))


def activation_quantizers() -> tuple[str, ...]:
  """Names of the registered activation quantizers, sorted."""
  return tuple(sorted(_table("activation")))


class OffGridError(ValueError):
  """A quantizer's forward output is not on the contract's integer grid."""


def _codes_of(value, step, lo, hi, no_zero):
  """Integer codes of ``value / step`` or a reason why they are not on the grid."""
  value, step = np.asarray(value, np.float64), np.asarray(step, np.float64)
  if not np.all(np.isfinite(value)):
    return None, "its output is not finite"
  if not (np.all(np.isfinite(step)) and np.all(step > 0)):
    return None, f"its scale is not positive and finite (min {np.min(step):.3g})"
  r = value / step
  codes = np.rint(r)
  bad = np.abs(r - codes) > GRID_TOL
  if bad.any():
    i = tuple(int(k) for k in np.argwhere(bad)[0])
    return None, f"value/scale is {r[i]:.6g} at index {i}, not an integer"
  out = (codes < lo) | (codes > hi) | ((codes == 0) & no_zero)
  if out.any():
    i = tuple(int(k) for k in np.argwhere(out)[0])
    grid = "{-1, +1}" if no_zero else f"[{lo}, {hi}]"
    return None, f"code {int(codes[i])} at index {i} is outside {grid}"
  return codes.astype(np.int32), None


def _weight_grid(w, bits, axis, out):
  """(QTensor, None) for a weight quantizer's ``(w_q, scale)``, or (None, reason)."""
  if not (isinstance(out, tuple) and len(out) == 2):
    return None, "it must return (w_q, scale)"
  w_q, scale = (np.asarray(o, np.float32) for o in out)
  want = 1 if axis is None else np.shape(w)[axis]
  if scale.size != want or w_q.shape != np.shape(w):
    return None, (f"w_q has shape {w_q.shape} for w {np.shape(w)} and scale {scale.size} "
                  f"entries; axis={axis} needs {want}")
  if axis is not None and scale.ndim:
    scale = scale.reshape([want if a == axis % w_q.ndim else 1 for a in range(w_q.ndim)])
  lo, hi = qrange(bits, True)
  codes, why = _codes_of(w_q, scale, lo, hi, no_zero=bits == 1)
  return (QTensor(codes, scale, bits, True), None) if why is None else (None, why)


def _activation_grid(alpha, bits, y):
  """(QTensor, None) for an activation quantizer's ``y``, or (None, reason)."""
  y = np.asarray(y, np.float32)
  if bits == 1:
    codes, why = _codes_of(y, 1.0, -1, 1, no_zero=True)
    return (QTensor(codes, np.float32(1), 1, True), None) if why is None else (None, why)
  step = np.asarray(alpha, np.float32) / np.float32(qrange(bits, False)[1])
  codes, why = _codes_of(y, step, *qrange(bits, False), no_zero=False)
  return (QTensor(codes, step, bits, False), None) if why is None else (None, why)


def check_on_grid(kind: str, name: str, *args, fn: Callable | None = None,
                  layer: str | None = None) -> QTensor:
  """Run quantizer ``name`` forward on ``args`` and check its output is on the grid.

  ``args`` are the contract's: ``(w, bits, axis)`` for a weight quantizer,
  ``(x, alpha, bits)`` for an activation one; ``fn`` defaults to the registered
  one. Returns the output as a ``QTensor`` of int32 codes (what export writes);
  an output off the grid raises ``OffGridError``, one line naming the
  quantizer (and ``layer`` when given).
  """
  _table(kind)
  fn = lookup(kind, name) if fn is None else fn
  out = jax.device_get(fn(*args))
  if kind == "weight":
    w, bits, axis = args
    qt, why = _weight_grid(w, bits, axis, out)
  else:
    _, alpha, bits = args
    qt, why = _activation_grid(alpha, bits, out)
  if why is not None:
    where = f" at layer {layer!r}" if layer else ""
    raise OffGridError(f"{kind} quantizer {name!r}{where} leaves the {bits}-bit grid: {why}")
  return qt
