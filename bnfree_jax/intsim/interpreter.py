"""Pure-jnp integer interpreter of a loaded artifact: uint8 pixels in, int32 logits out.

Per layer: conv/dense on int8 operands with int32 accumulation (XLA's fast int8 path),
or XOR/popcount for binary layers; + int32 bias; max-pool; output stage. Inputs wider
than int8 (the uint8 pixels, A = 8 codes) are shifted by -128 and the bias gets
+128*sum(w): pad(x, z) - 128 == pad(x - 128, z - 128), so the result is exact.
Max-pool is applied to the accumulator before the output stage; every output stage is
monotone non-decreasing, so max(f(acc)) == f(max(acc)) and the result is identical.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnfree_jax.intsim import binary, requant
from bnfree_jax.intsim.bounds import overflow_bounds

_DN = ("NHWC", "HWIO", "NHWC")


def _prepare(artifact) -> tuple:
    """Per-layer device params, cached on the artifact: packed binary weights, offset biases."""
    if "params" not in artifact.cache:
        params = []
        for layer, w, b, m, s in zip(artifact.layers, artifact.weights, artifact.biases,
                                     artifact.multipliers, artifact.shifts):
            p = {"m": jnp.asarray(m), "s": jnp.asarray(s)}
            if layer.binary:
                p["w"] = jnp.asarray(binary.pack_weight_bits(w))
                p["b"] = jnp.asarray(b)
            else:
                p["w"] = jnp.asarray(w)
                bias = b.astype(np.int64)
                if layer.in_max > 127:
                    bias = bias + 128 * w.astype(np.int64).reshape(-1, w.shape[-1]).sum(axis=0)
                p["b"] = jnp.asarray(bias.astype(np.int32))
            params.append(p)
        artifact.cache["params"] = tuple(params)
    return artifact.cache["params"]


def _conv_int8(layer, x, w, pad_value, first: bool):
    (pt, pb), (pl, pr) = layer.padding
    if layer.in_max > 127:
        x = (x.astype(jnp.int32) - 128).astype(jnp.int8)
        if first:
            xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            n, h, wd, c = x.shape
            inside = np.zeros((h + pt + pb, wd + pl + pr, 1), bool)
            inside[pt:pt + h, pl:pl + wd] = True
            z = jnp.asarray(np.asarray(pad_value, np.int32) - 128, jnp.int8)
            xp = jnp.where(jnp.asarray(inside), xp, z)
        else:
            xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=jnp.int8(-128))
        pads = ((0, 0), (0, 0))
    else:
        xp, pads = x.astype(jnp.int8), layer.padding
    return lax.conv_general_dilated(xp, w, (layer.stride, layer.stride), pads,
                                    dimension_numbers=_DN, preferred_element_type=jnp.int32)


def _dense_int8(layer, x, w):
    x = x.astype(jnp.int32)
    if layer.in_max > 127:
        x = x - 128
    return lax.dot_general(x.astype(jnp.int8), w, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.int32)


def _max_pool(y, k: int):
    n, h, w, c = y.shape
    ho, wo = h // k, w // k
    y = y[:, :ho * k, :wo * k, :].reshape(n, ho, k, wo, k, c)
    return jnp.max(y, axis=(2, 4))


def _layer(layer, p, x, pad_value, first: bool):
    """One layer -> (output codes int32, accumulator before pooling)."""
    if layer.kind == "dense":
        x = x.reshape(x.shape[0], -1)
        dot = binary.binary_dense(x, p["w"]) if layer.binary else _dense_int8(layer, x, p["w"])
    elif layer.binary:
        kh, kw = layer.weight_shape[:2]
        dot = binary.binary_conv(x, p["w"], kh, kw, layer.stride, layer.padding)
    else:
        dot = _conv_int8(layer, x, p["w"], pad_value, first)
    acc = dot + p["b"]
    y = _max_pool(acc, layer.pool) if layer.pool else acc
    if layer.output == "requant_relu":
        y = requant.requant_relu(y, p["m"], p["s"], layer.a_bits)
    elif layer.output == "sign":
        y = requant.sign(y)
    else:
        y = requant.requant_out(y, p["m"], p["s"])
    return y, acc


def _forward(layers, pad_value, with_stats: bool, params, images):
    x = images
    stats = []
    for i, (layer, p) in enumerate(zip(layers, params)):
        x, acc = _layer(layer, p, x, pad_value, first=i == 0)
        if with_stats:
            stats.append(jnp.max(jnp.abs(acc)))
    return (x, jnp.stack(stats)) if with_stats else x


@functools.lru_cache(maxsize=64)
def _compiled(layers, pad_value, with_stats: bool):
    return jax.jit(functools.partial(_forward, layers, pad_value, with_stats))


def check_images(artifact, images) -> None:
    """Raise ValueError unless `images` is uint8 [N, H, W, C] matching the artifact's input."""
    dtype = getattr(images, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got dtype {dtype}")
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != tuple(artifact.input_shape):
        raise ValueError(f"images must have shape [N, {', '.join(map(str, artifact.input_shape))}] "
                         f"(NHWC), got {list(shape)}")


def run_int(artifact, images, *, batch_size: int | None = None, with_stats: bool = False):
    """int32 logits [N, classes] of uint8 `images` [N, H, W, C]; jitted, in chunks of
    `batch_size`. With `with_stats`, also the largest |acc| per layer (int32 [L])."""
    check_images(artifact, images)
    fn = _compiled(artifact.layers, artifact.pad_value, with_stats)
    params = _prepare(artifact)
    n = images.shape[0]
    if batch_size is None or n <= batch_size:
        return fn(params, images)
    outs = [fn(params, images[i:i + batch_size]) for i in range(0, n, batch_size)]
    if not with_stats:
        return jnp.concatenate(outs)
    return (jnp.concatenate([o[0] for o in outs]),
            jnp.max(jnp.stack([o[1] for o in outs]), axis=0))


def run_int_with_stats(artifact, images, *, batch_size: int | None = None):
    """(int32 logits, int32 [L] largest |acc| seen per layer)."""
    return run_int(artifact, images, batch_size=batch_size, with_stats=True)


def evaluate(artifact, images, labels, *, batch_size: int = 1000) -> dict:
    """Top-1 accuracy of the artifact (argmax of int32 logits, ties -> lowest index)
    plus per-layer accumulator extremes against their static bounds."""
    check_images(artifact, images)
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape [{images.shape[0]}], got {labels.dtype} {list(labels.shape)}")
    logits, acc_max = run_int_with_stats(artifact, images, batch_size=batch_size)
    pred = np.argmax(np.asarray(logits), axis=-1)
    correct = int(np.sum(pred == labels))
    n = int(labels.shape[0])
    names = [layer.name for layer in artifact.layers]
    acc_max = [int(v) for v in np.asarray(acc_max)]
    bounds = [row["bound"] for row in overflow_bounds(artifact)]
    return {
        "top1": correct / max(n, 1), "n": n, "correct": correct,
        "max_abs_acc": dict(zip(names, acc_max)),
        "acc_bound": dict(zip(names, bounds)),
        "observed_headroom_bits": {k: 31 - v.bit_length() for k, v in zip(names, acc_max)},
    }
