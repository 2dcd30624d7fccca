"""QTensor: integer codes and their scale, the quantizers' hand-off to export."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct


def qrange(bits: int, signed: bool) -> tuple[int, int]:
  """Integer code range by the project's conventions (zero-point 0).

  Signed: narrow symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]``, and ``{-1, +1}`` for
  b = 1 (the range returned is then [-1, 1]; 0 is never produced).
  Unsigned: ``[0, 2^b - 1]``.
  """
  if bits < 1:
    raise ValueError(f"bits must be >= 1, got {bits}")
  if signed:
    qmax = 1 if bits == 1 else 2 ** (bits - 1) - 1
    return -qmax, qmax
  return 0, 2 ** bits - 1


@struct.dataclass
class QTensor:
  """Codes and scale of a quantized tensor: ``value = codes * scale``.

  In training ``codes`` is a float array holding integers, so straight-through
  gradients flow through it; ``int_codes`` casts it for export. ``scale`` is a
  scalar or broadcastable against ``codes`` (one scale per channel).
  """
  codes: Any
  scale: Any
  bits: int = struct.field(pytree_node=False)
  signed: bool = struct.field(pytree_node=False)

  @property
  def qmin(self) -> int:
    return qrange(self.bits, self.signed)[0]

  @property
  def qmax(self) -> int:
    return qrange(self.bits, self.signed)[1]

  def dequantize(self):
    """The fake-quantized float value, ``codes * scale``."""
    return self.codes * self.scale

  def int_codes(self, dtype=jnp.int8):
    """The codes cast to an integer dtype (they hold exact integers already)."""
    return jnp.asarray(self.codes).astype(dtype)
