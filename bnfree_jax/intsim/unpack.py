"""Reader-side decoding of packed weight codes (independent of the writer's packer).

Element i of a b-bit stream (b in 1..7) is read from the little-endian 16-bit window
starting at byte (i*b)//8, shifted right by (i*b) % 8 and masked to b bits; b-bit
two's complement for b >= 2, and bit 1 = +1 / bit 0 = -1 for b = 1.
"""

from __future__ import annotations

import numpy as np


def stream_nbytes(count: int, bits: int) -> int:
    """Length in bytes of a packed stream of `count` b-bit fields."""
    return (count * bits + 7) // 8


def decode_codes(data: np.ndarray, bits: int, shape) -> np.ndarray:
    """Packed bytes (or int8 for b = 8) -> int8 codes of the logical `shape`."""
    shape = tuple(int(s) for s in shape)
    if bits == 8:
        return np.asarray(data).astype(np.int8).reshape(shape)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.concatenate([np.asarray(data, np.uint8).reshape(-1), np.zeros(2, np.uint8)])
    start = np.arange(count, dtype=np.int64) * bits
    byte, offset = start >> 3, start & 7
    window = raw[byte].astype(np.int64) | (raw[byte + 1].astype(np.int64) << 8)
    field = (window >> offset) & ((1 << bits) - 1)
    if bits == 1:
        value = field * 2 - 1
    else:
        sign = 1 << (bits - 1)
        value = (field ^ sign) - sign
    return value.astype(np.int8).reshape(shape)


def narrow_range(bits: int) -> tuple[int, int]:
    """Valid signed codes of a b-bit weight: narrow range, {-1, +1} for b = 1."""
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
