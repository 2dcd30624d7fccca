"""Quantizer arithmetic in float32 whatever the compute dtype.

``x / s``, the rounding, the clipping and the LSQ/PACT gradients computed in bfloat16
move codes by one step (about 1-3 % of them at 4 bits, a fifth at 8 bits): codes and
scales would depend on the compute dtype. A quantizer wrapped in ``in_float32`` sees float32 copies of its
narrow-float (bfloat16, float16) array arguments and casts its value back to the
dtype of ``x`` (its float outputs; integer codes stay as they are); a ``QTensor``
keeps its float32 codes and scale (what export reads).
Float32 (and float64) inputs run the quantizer untouched, so their jaxpr is the
same as without the wrapper.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bnfree_jax.quant.qtensor import QTensor

NARROW_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _narrow(v) -> bool:
  return hasattr(v, "dtype") and jnp.dtype(v.dtype) in NARROW_FLOATS


def _up(v):
  return v.astype(jnp.float32) if _narrow(v) else v


def in_float32(fn):
  """Run quantizer ``fn(x, *args, **kwargs)`` in float32 when ``x`` is a narrow float."""

  @functools.wraps(fn)
  def wrapped(x, *args, **kwargs):
    if not _narrow(x):
      return fn(x, *args, **kwargs)
    out = fn(_up(x), *map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
    if isinstance(out, QTensor):
      return out
    return jax.tree.map(lambda o: o.astype(x.dtype) if jnp.issubdtype(o.dtype, jnp.floating) else o,
                        out)

  return wrapped
