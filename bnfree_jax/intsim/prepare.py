"""Load-time preparation of the interpreter's device params (numpy, once per artifact).

Every layer then runs one native op on int8 (or packed-bit) operands plus a bias:

* inputs wider than int8 (pixels; codes of an A = 8 layer) travel as `x - 128`, and
  the conv pads with zero natively. The exact difference is static per output position:
  `128 * sum_{real taps} sum_c w + sum_{padded taps} sum_c P_c w` (P = the pixel
  pad value for the first layer, 0 after), folded with the bias into a [Ho, Wo, Cout]
  tensor. Inputs that fit int8 (A <= 7, +-1) need no offset and keep a [Cout] bias.
* binary layers read padded taps as all-zero words; `K + sum_{padded taps} sum_c w`
  goes into the bias the same way, and the weight words are stored [words, Cout].

Folded biases are stored modulo 2^32: the final accumulator fits int32 (the loader
proves it) and int32 adds wrap, so the sum is exact even if one addend would not fit.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bnfree_jax.intsim import binary

OFFSET = 128


def wrap_int32(v) -> np.ndarray:
    """int64 values -> int32 modulo 2^32 (two's complement)."""
    v = np.asarray(v, np.int64)
    return (((v + 2**31) % 2**32) - 2**31).astype(np.int32)


def _conv_bias(layer, w: np.ndarray, bias: np.ndarray, pad_value, first: bool) -> np.ndarray:
    """bias folded with the offset / padding correction of an int8 conv, [Cout] or [Ho, Wo, Cout]."""
    if layer.in_max <= 127:
        return bias.astype(np.int64)
    h, wd, c = layer.in_shape
    kh, kw, _, cout = w.shape
    valid = binary.tap_validity(h, wd, kh, kw, layer.stride, layer.padding).astype(np.int64)
    w64 = w.astype(np.int64).reshape(kh * kw, c, cout)
    real = OFFSET * w64.sum(axis=1)                                   # [taps, Cout]
    pad = np.asarray(pad_value if first else [0] * c, np.int64)
    padded = np.einsum("c,tco->to", pad, w64)
    return bias.astype(np.int64) + valid @ real + (1 - valid) @ padded


def _binary_params(layer, w: np.ndarray, bias: np.ndarray) -> dict:
    wt = binary.pack_weight_bits(w)                                   # [words, Cout]
    k = int(np.prod(w.shape[:-1]))
    b = bias.astype(np.int64) + k
    if layer.kind == "conv":
        h, wd, c = layer.in_shape
        kh, kw, _, cout = w.shape
        valid = binary.tap_validity(h, wd, kh, kw, layer.stride, layer.padding)
        b = b + binary.conv_correction(w.astype(np.int64).reshape(kh * kw, c, cout).sum(axis=1), valid)
    return {"w": jnp.asarray(wt), "b": jnp.asarray(wrap_int32(b))}


def prepare(artifact) -> tuple:
    """Per-layer device params {w, b, m, s}, computed once and cached on the artifact."""
    if "params" in artifact.cache:
        return artifact.cache["params"]
    params = []
    for i, (layer, w, b, m, s) in enumerate(zip(artifact.layers, artifact.weights, artifact.biases,
                                                artifact.multipliers, artifact.shifts)):
        if layer.binary:
            p = _binary_params(layer, w, b)
        elif layer.kind == "conv":
            p = {"w": jnp.asarray(w), "b": jnp.asarray(wrap_int32(_conv_bias(layer, w, b, artifact.pad_value, i == 0)))}
        else:
            bias = b.astype(np.int64)
            if layer.in_max > 127:
                bias = bias + OFFSET * w.astype(np.int64).sum(axis=0)
            p = {"w": jnp.asarray(w), "b": jnp.asarray(wrap_int32(bias))}
        p.update(m=jnp.asarray(m), s=jnp.asarray(s))
        params.append(p)
    artifact.cache["params"] = tuple(params)
    return artifact.cache["params"]
