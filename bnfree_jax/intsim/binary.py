"""Binary layers: +-1 activations and weights as bits in uint32 words, XOR + popcount.

Bit = 1 means +1. Activations are packed along the channel (conv) or contraction
(dense) axis, 32 per word, channel c in bit c % 32 of word c // 32, unused tail bits 0.
A padded conv position is an all-zero word that the static `valid` mask removes:
dot = K_valid - 2 * popcount(xor(a, w) & valid).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

U32 = jnp.uint32


def n_words(c: int) -> int:
    return (c + 31) // 32


def pack_weight_bits(w: np.ndarray) -> np.ndarray:
    """+-1 weights [..., C, Cout] -> uint32 words [Cout, prod(...)*n_words(C)] (numpy, at load)."""
    *lead, c, cout = w.shape
    nw = n_words(c)
    bits = (w > 0).astype(np.uint64)
    bits = np.concatenate([bits, np.zeros((*lead, nw * 32 - c, cout), np.uint64)], axis=-2)
    bits = bits.reshape(*lead, nw, 32, cout)
    words = (bits << np.arange(32, dtype=np.uint64)[:, None]).sum(axis=-2).astype(np.uint32)
    return np.ascontiguousarray(words.reshape(-1, cout).T)


def pack_activation_bits(x):
    """+-1 codes [..., C] -> uint32 words [..., n_words(C)] (jnp, inside the graph)."""
    c = x.shape[-1]
    nw = n_words(c)
    bits = (x > 0).astype(U32)
    if nw * 32 != c:
        bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, nw * 32 - c)])
    bits = bits.reshape(*x.shape[:-1], nw, 32)
    return jnp.sum(bits << jnp.arange(32, dtype=U32), axis=-1, dtype=U32)


def conv_masks(h: int, w: int, c: int, kh: int, kw: int, stride: int, padding):
    """Static valid-bit mask [Ho, Wo, kh*kw*nw] (uint32) and K_valid [Ho, Wo] (int32)."""
    (pt, pb), (pl, pr) = padding
    ho, wo = (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1
    rows = np.arange(ho)[:, None] * stride + np.arange(kh)[None, :] - pt
    cols = np.arange(wo)[:, None] * stride + np.arange(kw)[None, :] - pl
    rv = (rows >= 0) & (rows < h)
    cv = (cols >= 0) & (cols < w)
    pos = rv[:, None, :, None] & cv[None, :, None, :]          # [Ho, Wo, kh, kw]
    nw = n_words(c)
    full = np.array([min(32, c - 32 * q) for q in range(nw)])
    chan = np.array([(1 << int(f)) - 1 for f in full], np.uint64).astype(np.uint32)
    mask = np.where(pos[..., None], chan, np.uint32(0)).astype(np.uint32)
    kvalid = (pos.sum(axis=(2, 3)) * c).astype(np.int32)
    return mask.reshape(ho, wo, kh * kw * nw), kvalid


def binary_conv(x, wpk, kh: int, kw: int, stride: int, padding):
    """x: +-1 codes [N, H, W, C]; wpk: [Cout, kh*kw*nw] -> int32 dot [N, Ho, Wo, Cout]."""
    _, h, w, c = x.shape
    mask, kvalid = conv_masks(h, w, c, kh, kw, stride, padding)
    ho, wo = kvalid.shape
    (pt, pb), (pl, pr) = padding
    words = jnp.pad(pack_activation_bits(x), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    taps = [words[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.stack(taps, axis=3).reshape(x.shape[0], ho, wo, -1)
    hits = (patches[:, :, :, None, :] ^ wpk) & jnp.asarray(mask)[None, :, :, None, :]
    pc = jnp.sum(lax.population_count(hits).astype(jnp.int32), axis=-1)
    return jnp.asarray(kvalid)[None, :, :, None] - 2 * pc


def binary_dense(x, wpk):
    """x: +-1 codes [N, K]; wpk: [Cout, n_words(K)] (tail bits 0 on both sides) -> int32 [N, Cout]."""
    words = pack_activation_bits(x)
    pc = jnp.sum(lax.population_count(words[:, None, :] ^ wpk).astype(jnp.int32), axis=-1)
    return jnp.int32(x.shape[-1]) - 2 * pc
