"""Bit packing of signed weight codes for the integer artifact.

One rule for every width b in 1..7: the flattened (row-major) code array becomes an
LSB-first bitstream; element i occupies stream bits [i*b, (i+1)*b), stream bit j is
bit (j mod 8) of byte j // 8. Fields are b-bit two's complement for b >= 2; for b = 1
bit 1 means +1 and bit 0 means -1. For b = 1, 2, 4 this is "little-endian within a
byte": element i sits in byte i // (8/b) at bits [(i mod 8/b)*b, ...). b = 8 is stored
unpacked as int8. The interpreter unpacks with its own code; keep the two apart.
"""

from __future__ import annotations

import numpy as np


def code_range(bits: int) -> tuple[int, int]:
    """Inclusive (lo, hi) of narrow-range signed codes; b = 1 is {-1, +1}."""
    if bits == 1:
        return -1, 1
    hi = 2 ** (bits - 1) - 1
    return -hi, hi


def check_codes(codes: np.ndarray, bits: int, what: str) -> None:
    """Raise ValueError if `codes` are not valid `bits`-bit weight codes."""
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"{what}: weight bits must be an int in 1..8, got {bits!r}")
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what}: weight codes must be integers, got dtype {codes.dtype}")
    lo, hi = code_range(int(bits))
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(
            f"{what}: {bits}-bit weight codes must lie in [{lo}, {hi}], "
            f"got [{int(codes.min())}, {int(codes.max())}]")
    if bits == 1 and codes.size and np.any(codes == 0):
        raise ValueError(f"{what}: 1-bit weight codes must be -1 or +1, found 0")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of the packed stream of `count` codes of width `bits`."""
    return count if bits == 8 else (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes: int8 array of the same shape for b = 8, else a 1-D uint8 stream."""
    check_codes(codes, bits, "pack_codes")
    codes = np.asarray(codes)
    if bits == 8:
        return codes.astype(np.int8)
    flat = codes.reshape(-1).astype(np.int64)
    field = (flat > 0).astype(np.int64) if bits == 1 else flat & ((1 << bits) - 1)
    stream = ((field[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, shape) -> np.ndarray:
    """Inverse of `pack_codes` (writer side, used by the writer's own checks)."""
    shape = tuple(int(s) for s in shape)
    if bits == 8:
        return np.asarray(packed, np.int8).reshape(shape)
    count = int(np.prod(shape, dtype=np.int64))
    stream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
    fields = stream[: count * bits].reshape(count, bits).astype(np.int64)
    value = (fields << np.arange(bits)).sum(axis=1)
    if bits == 1:
        value = 2 * value - 1
    else:
        value = np.where(value >= 1 << (bits - 1), value - (1 << bits), value)
    return value.astype(np.int8).reshape(shape)
