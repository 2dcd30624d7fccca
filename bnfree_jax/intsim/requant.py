"""Exact requantisation `(acc*M + 2^(s-1)) >> s` with 32-bit integer arithmetic only.

The 64-bit product is carried as a (hi: int32, lo: uint32) pair: a 32x32 -> 64
unsigned multiply from 16-bit limbs, two's-complement negation, a carried add of the
rounding constant and an arithmetic 64-bit shift. No int64 (so no x64 mode), no float:
the same recipe runs on a microcontroller without a 64-bit multiplier.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

U32 = jnp.uint32
_LOW16 = 0xFFFF


def _u32(x):
    return lax.bitcast_convert_type(x, U32)


def _i32(x):
    return lax.bitcast_convert_type(x, jnp.int32)


def _umul_32x32(a, b):
    """Unsigned 32x32 -> 64 product as (hi, lo) uint32."""
    a_lo, a_hi = a & U32(_LOW16), a >> U32(16)
    b_lo, b_hi = b & U32(_LOW16), b >> U32(16)
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> U32(16)) + (lh & U32(_LOW16)) + (hl & U32(_LOW16))
    lo = (ll & U32(_LOW16)) | (mid << U32(16))
    hi = hh + (lh >> U32(16)) + (hl >> U32(16)) + (mid >> U32(16))
    return hi, lo


def _shift_pair(s, amount_lo, amount_hi):
    """uint32 shift amounts clipped into [0, 31] for both branches of the 64-bit shift."""
    return jnp.clip(s - amount_lo, 0, 31).astype(U32), jnp.clip(s - amount_hi, 0, 31).astype(U32)


def mul_round_shift(acc, multiplier, shift):
    """Exact floor((acc*M + 2^(s-1)) / 2^s) as a 64-bit (hi int32, lo uint32) pair.

    acc: int32; multiplier: int32 > 0; shift: int32 in [0, 62]; broadcastable.
    """
    acc = acc.astype(jnp.int32)
    m = _u32(multiplier.astype(jnp.int32))
    s = shift.astype(jnp.int32)
    neg = acc < 0
    ua = _u32(acc)
    mag = jnp.where(neg, (~ua) + U32(1), ua)
    hi, lo = _umul_32x32(mag, m)
    n_lo = (~lo) + U32(1)
    n_hi = (~hi) + jnp.where(lo == U32(0), U32(1), U32(0))
    hi, lo = jnp.where(neg, n_hi, hi), jnp.where(neg, n_lo, lo)
    # rounding constant 2^(s-1) (0 when s == 0), split over the pair
    r_small = jnp.clip(s - 1, 0, 31).astype(U32)
    r_lo = jnp.where((s >= 1) & (s <= 32), U32(1) << r_small, U32(0))
    r_hi = jnp.where(s >= 33, U32(1) << jnp.clip(s - 33, 0, 31).astype(U32), U32(0))
    lo2 = lo + r_lo
    hi = hi + r_hi + jnp.where(lo2 < lo, U32(1), U32(0))
    lo = lo2
    shi = _i32(hi)
    # arithmetic 64-bit shift right by s
    s_small = jnp.clip(s, 0, 31).astype(U32)
    carry_in = jnp.where(s == 0, U32(0), hi << jnp.clip(32 - s, 0, 31).astype(U32))
    lo_small = (lo >> s_small) | carry_in
    hi_small = shi >> _i32(s_small)
    s_big = jnp.clip(s - 32, 0, 31)
    lo_big = _u32(shi >> s_big)
    hi_big = shi >> 31
    big = s >= 32
    return jnp.where(big, hi_big, hi_small), jnp.where(big, lo_big, lo_small)


def requant_relu(acc, multiplier, shift, a_bits: int):
    """clamp((acc*M + 2^(s-1)) >> s, 0, 2^A - 1) as int32."""
    hi, lo = mul_round_shift(acc, multiplier, shift)
    top = U32(2**a_bits - 1)
    small = jnp.minimum(lo, top)
    out = jnp.where(hi < 0, U32(0), jnp.where(hi > 0, top, small))
    return _i32(out)


def requant_out(acc, multiplier, shift):
    """(acc*M + 2^(s-1)) >> s saturated to int32."""
    hi, lo = mul_round_shift(acc, multiplier, shift)
    ilo = _i32(lo)
    fits = hi == (ilo >> 31)
    sat = jnp.where(hi < 0, jnp.int32(-(2**31)), jnp.int32(2**31 - 1))
    return jnp.where(fits, ilo, sat)


def sign(acc):
    """+1 if acc >= 0 else -1, as int32."""
    return jnp.where(acc >= 0, jnp.int32(1), jnp.int32(-1))
