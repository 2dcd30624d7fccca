"""The student's own integer-simulation mode: the exported integer layers run with jnp int32
convolutions and numpy int64 requantisation. Written independently of `bnfree_jax.intsim`
so that bit-for-bit agreement between the two is evidence, not tautology."""

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
            acc = np.asarray(_conv(jnp.asarray(x), jnp.asarray(w), layer["stride"], pad))
        else:
            acc = np.asarray(_dense(jnp.asarray(x.reshape(x.shape[0], -1)), jnp.asarray(w)))
        acc = acc.astype(np.int64) + layer["bias"].astype(np.int64)
        y = _output(layer, acc)
        if layer.get("pool"):
            y = _pool(y, layer["pool"])
        x = y
    return x


def int_sim_batched(layers, input_spec, images, batch: int = 1000) -> np.ndarray:
    return np.concatenate([int_sim_logits(layers, input_spec, images[i:i + batch])
                           for i in range(0, len(images), batch)])
