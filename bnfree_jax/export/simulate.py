"""The student's own integer-simulation mode: the exported integer layers run with jnp
convolutions accumulating in int32 and numpy int64 requantisation. Written independently
of `bnfree_jax.intsim` so that bit-for-bit agreement between the two is evidence, not
tautology.

Operands are int8: XLA's int32 x int32 convolution on CPU is ~50x slower than its int8 one
(2.98 s vs 0.057 s for a 3x3x32x64 conv over 1000 14x14 maps), so a layer input x (codes
in [0, 255] or +-1, pixels in [0, 255]) is split into x = 16*hi + lo with hi, lo int8, and
the accumulator is 16*op(hi, w) + op(lo, w): the same int32 (mod 2^32) as op(x, w). The
interpreter reaches int8 another way (x - 128 and a bias correction), so the two stay
independent."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("stride", "padding"))
def _conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [tuple(p) for p in padding],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        preferred_element_type=jnp.int32)


@jax.jit
def _dense(x, w):
    return jax.lax.dot(x, w, preferred_element_type=jnp.int32)


INT8 = (-128, 127)


def _fits_int8(a: np.ndarray) -> bool:
    return a.size == 0 or (int(a.min()) >= INT8[0] and int(a.max()) <= INT8[1])


def _int8_accumulate(op, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """op(x, w) accumulated in int32 on int8 operands (module docstring); int32 operands
    when x or w leaves the range the split covers."""
    if not (_fits_int8(w) and _fits_int8(x >> 4)):
        return np.asarray(op(jnp.asarray(x, jnp.int32), jnp.asarray(w, jnp.int32)))
    hi, lo = jnp.asarray(x >> 4, jnp.int8), jnp.asarray(x & 15, jnp.int8)
    w8 = jnp.asarray(w, jnp.int8)
    return np.asarray(16 * op(hi, w8) + op(lo, w8))


def _output(layer, acc: np.ndarray) -> np.ndarray:
    if layer["output"] == "sign":
        return np.where(acc >= 0, 1, -1).astype(np.int32)
    prod = acc.astype(np.int64) * layer["multiplier"].astype(np.int64)
    sh = layer["shift"].astype(np.int64)
    y = (prod + np.where(sh > 0, np.left_shift(np.int64(1), np.maximum(sh - 1, 0)), 0)) >> sh
    if layer["output"] == "requant_relu":
        return np.clip(y, 0, 2 ** layer["a_bits"] - 1).astype(np.int32)
    return np.clip(y, -(2 ** 31), 2 ** 31 - 1).astype(np.int32)


def _pool(y: np.ndarray, k: int) -> np.ndarray:
    n, h, w, c = y.shape
    h2, w2 = h // k, w // k
    return y[:, : h2 * k, : w2 * k].reshape(n, h2, k, w2, k, c).max(axis=(2, 4))


def int_sim_logits(layers: list, input_spec: dict, images: np.ndarray) -> np.ndarray:
    """int32 logits of uint8 images through the integer layers produced by `integerize`."""
    x = np.asarray(images).astype(np.int32)
    z = np.asarray(input_spec["pad_value"], np.int32)
    for i, layer in enumerate(layers):
        w = np.asarray(layer["weight"], np.int32)
        if layer["kind"] == "conv":
            if i == 0:  # pad with the pixel value z explicitly, then convolve unpadded
                (pt, pb), (pl, pr) = layer["padding"]
                x = np.pad(x - z, ((0, 0), (pt, pb), (pl, pr), (0, 0))) + z
                pad = ((0, 0), (0, 0))
            else:
                pad = tuple(tuple(p) for p in layer["padding"])
            acc = _int8_accumulate(lambda a, b: _conv(a, b, layer["stride"], pad), x, w)
        else:
            acc = _int8_accumulate(_dense, x.reshape(x.shape[0], -1), w)
        acc = acc.astype(np.int64) + layer["bias"].astype(np.int64)
        y = _output(layer, acc)
        if layer.get("pool"):
            y = _pool(y, layer["pool"])
        x = y
    return x


def int_sim_batched(layers, input_spec, images, batch: int = 1000) -> np.ndarray:
    return np.concatenate([int_sim_logits(layers, input_spec, images[i:i + batch])
                           for i in range(0, len(images), batch)])
