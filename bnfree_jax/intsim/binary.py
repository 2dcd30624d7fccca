"""Binary layers: +-1 activations and weights as bits in uint32 words, XOR + popcount.

Bit = 1 means +1. Activations are packed along the channel (conv) or contraction
(dense) axis, 32 per word, channel c in bit c % 32 of word c // 32, unused tail bits 0
on both sides (so they never differ).

Speed: XLA has no XNOR-GEMM, and a `sum(popcount(a[..., None, :] ^ w), -1)` reduction
materialises or loops badly (~40x slower than int8). Written instead as an unrolled sum
over the contraction words of `popcount(a[..., k:k+1] ^ w[k])`, XLA fuses all terms
into one elementwise loop over [..., Cout] whose accumulator stays in vector registers
(AVX-512 VPOPCNTD); that runs at int8-GEMM speed or better. Padded conv taps are
all-zero words (every channel read as -1); instead of masking them per position, a
static per-position correction `sum over padded taps of sum_c w` is added to the bias:
dot = K + corr - 2 * popcount(xor(a, w)).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

U32 = jnp.uint32
CHUNK = 32          # popcount terms per fused sum (bounds compile time of wide layers)


def n_words(c: int) -> int:
    return (c + 31) // 32


def pack_weight_bits(w: np.ndarray) -> np.ndarray:
    """+-1 weights [..., C, Cout] -> uint32 words [prod(...)*n_words(C), Cout] (numpy, at load).

    Cout is the contiguous axis: the popcount loop vectorises over it, and a transpose
    fused into that loop (strided loads) would cost ~2.5x."""
    *lead, c, cout = w.shape
    nw = n_words(c)
    bits = (w > 0).astype(np.uint64)
    bits = np.concatenate([bits, np.zeros((*lead, nw * 32 - c, cout), np.uint64)], axis=-2)
    bits = bits.reshape(*lead, nw, 32, cout)
    words = (bits << np.arange(32, dtype=np.uint64)[:, None]).sum(axis=-2).astype(np.uint32)
    return np.ascontiguousarray(words.reshape(-1, cout))


def pack_activation_bits(x):
    """+-1 codes [..., C] -> uint32 words [..., n_words(C)] (jnp, inside the graph)."""
    c = x.shape[-1]
    nw = n_words(c)
    if nw * 32 != c:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nw * 32 - c)])
    x = x.reshape(*x.shape[:-1], nw, 32)
    word = None
    for b in range(32):                      # unrolled OR: one fused loop, no row reduction
        bit = (x[..., b] > 0).astype(U32) << U32(b)
        word = bit if word is None else word | bit
    return word


def tap_validity(h: int, w: int, kh: int, kw: int, stride: int, padding) -> np.ndarray:
    """Static bool [Ho, Wo, kh*kw]: tap (i, j) of output (ho, wo) reads a real pixel."""
    (pt, pb), (pl, pr) = padding
    ho, wo = (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1
    rows = np.arange(ho)[:, None] * stride + np.arange(kh)[None, :] - pt
    cols = np.arange(wo)[:, None] * stride + np.arange(kw)[None, :] - pl
    rv = (rows >= 0) & (rows < h)
    cv = (cols >= 0) & (cols < w)
    return (rv[:, None, :, None] & cv[None, :, None, :]).reshape(ho, wo, kh * kw)


def _sum_popcounts(terms):
    """Sum of popcount(a ^ b) over (a, b) pairs, in fused chunks of CHUNK terms."""
    total = None
    for k0 in range(0, len(terms), CHUNK):
        part = None
        for a, b in terms[k0:k0 + CHUNK]:
            t = lax.population_count(a ^ b)
            part = t if part is None else part + t
        total = part if total is None else total + part
    return lax.bitcast_convert_type(total, jnp.int32)


def conv_popcount(words, wt, kh: int, kw: int, stride: int, padding, pool: int = 1, phase=(0, 0)):
    """popcount(xor) per output: words [N, H, W, nw] (unpadded), wt [kh*kw*nw, Cout]
    -> int32 [N, Ho, Wo, Cout]; padded taps read as zero words. With `pool` = k, only
    the outputs (phase[0] + k*r, phase[1] + k*c) that a k x k VALID pool reads,
    [N, Ho // k, Wo // k, Cout]: the max over the k*k phases is the pooled map, and
    each phase is one fused loop (a pool fused onto the full map runs ~5x slower)."""
    n, h, w, nw = words.shape
    (pt, pb), (pl, pr) = padding
    ho, wo = (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1
    ho, wo, step = ho // pool, wo // pool, stride * pool
    wp = jnp.pad(words, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    terms = []
    for i in range(kh):
        for j in range(kw):
            r0, c0 = phase[0] * stride + i, phase[1] * stride + j
            tap = wp[:, r0:r0 + step * (ho - 1) + 1:step, c0:c0 + step * (wo - 1) + 1:step, :]
            for q in range(nw):
                terms.append((tap[..., q:q + 1], wt[(i * kw + j) * nw + q]))
    return _sum_popcounts(terms)


def dense_popcount(words, wt):
    """words [N, nw], wt [nw, Cout] -> int32 [N, Cout] popcount(xor) per output."""
    return _sum_popcounts([(words[:, k:k + 1], wt[k]) for k in range(words.shape[1])])


def conv_correction(tap_sums, valid: np.ndarray):
    """[Ho, Wo, Cout] sum over the padded taps of sum_c w (tap_sums [kh*kw, Cout])."""
    pad = (~valid).astype(np.int32)
    if isinstance(tap_sums, np.ndarray):
        return pad.astype(np.int64) @ tap_sums.astype(np.int64)
    return jnp.einsum("hwt,to->hwo", jnp.asarray(pad), tap_sums, preferred_element_type=jnp.int32)


def binary_conv(x, wpk, kh: int, kw: int, stride: int, padding):
    """x: +-1 codes [N, H, W, C]; wpk: [kh*kw*nw, Cout] -> int32 dot [N, Ho, Wo, Cout]."""
    _, h, w, c = x.shape
    nw = n_words(c)
    valid = tap_validity(h, w, kh, kw, stride, padding)
    plus = jnp.sum(lax.population_count(wpk).astype(jnp.int32).reshape(kh * kw, nw, -1), axis=1)
    corr = conv_correction(2 * plus - c, valid)
    pc = conv_popcount(pack_activation_bits(x), wpk, kh, kw, stride, padding)
    return (kh * kw * c + corr) - 2 * pc


def binary_dense(x, wpk):
    """x: +-1 codes [N, K]; wpk: [n_words(K), Cout] (tail bits 0 on both sides) -> int32 [N, Cout]."""
    return jnp.int32(x.shape[-1]) - 2 * dense_popcount(pack_activation_bits(x), wpk)
