"""Pure-jnp integer interpreter of a loaded artifact: uint8 pixels in, int32 logits out.

Per layer: one native conv/dense on int8 operands with int32 accumulation (XLA's fast
int8 path), or XOR/popcount on packed words for binary layers; + a bias prepared at
load (`prepare.py`: offsets and padding folded in); max-pool; output stage. Each output
stage emits the next layer's operand directly: int8 codes (A <= 7, +-1), codes - 128 as
int8 (A = 8; the next bias carries the +128), or int32 logits. Max-pool is applied to
the accumulator before the output stage; every output stage is monotone non-decreasing,
so max(f(acc)) == f(max(acc)) and the result is identical. The whole forward is one
jitted function per (artifact plan, batch shape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnfree_jax.intsim import binary, requant
from bnfree_jax.intsim.bounds import overflow_bounds
from bnfree_jax.intsim.prepare import OFFSET, prepare

_DN = ("NHWC", "HWIO", "NHWC")
_DOT = (((1,), (0,)), ((), ()))
_BIN_CHUNK = 32           # images per step of a pooled binary conv when the full map is needed (stats)
_TAPS_MAX = 32            # convs with at most this many taps*channels run as fused multiply-adds


def _pixels_int8(images):
    """uint8 p -> int8 p - 128 (flip of the top bit)."""
    return lax.bitcast_convert_type(images ^ jnp.uint8(OFFSET), jnp.int8)


def _conv_int8(layer, x, w):
    return lax.conv_general_dilated(x, w, (layer.stride, layer.stride), layer.padding,
                                    dimension_numbers=_DN, preferred_element_type=jnp.int32)


def _conv_taps(layer, x, w):
    """A conv with few taps*channels (the first layer: 3x3x3, 5x5x1) as an unrolled
    elementwise multiply-add: XLA fuses it with the bias, pool and requant, so the
    full-resolution accumulator is never written (2-2.5x faster than the int8 conv there)."""
    (pt, pb), (pl, pr) = layer.padding
    kh, kw, c, _ = w.shape
    st = layer.stride
    n, h, wd, _ = x.shape
    ho, wo = (h + pt + pb - kh) // st + 1, (wd + pl + pr - kw) // st + 1
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))).astype(jnp.int16)
    w = w.astype(jnp.int16)             # |x * w| <= 128 * 127 fits int16: 2x the lanes
    acc = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i:i + st * (ho - 1) + 1:st, j:j + st * (wo - 1) + 1:st, :]
            for ch in range(c):
                t = (tap[..., ch:ch + 1] * w[i, j, ch]).astype(jnp.int32)
                acc = t if acc is None else acc + t
    return acc


def _dot(layer, p, x):
    """int32 accumulator before the bias: x is int8 (or +-1 int8 codes for binary)."""
    if layer.kind == "dense":
        x = x.reshape(x.shape[0], -1)
        if layer.binary:
            return -2 * binary.dense_popcount(binary.pack_activation_bits(x), p["w"])
        return lax.dot_general(x, p["w"], _DOT, preferred_element_type=jnp.int32)
    if layer.binary:
        kh, kw = layer.weight_shape[:2]
        if not layer.pool:
            return -2 * binary.conv_popcount(binary.pack_activation_bits(x), p["w"], kh, kw,
                                             layer.stride, layer.padding)

        def one(xc):                     # one image; lax.map (over chunks) keeps the
            words = binary.pack_activation_bits(xc[None])   # popcount sum out of the pool fusion
            return -2 * binary.conv_popcount(words, p["w"], kh, kw, layer.stride, layer.padding)[0]
        return lax.map(one, x, batch_size=min(_BIN_CHUNK, x.shape[0]))
    if int(np.prod(layer.weight_shape[:3])) <= _TAPS_MAX:
        return _conv_taps(layer, x, p["w"])
    return _conv_int8(layer, x, p["w"])


def _binary_conv_pooled(layer, p, x):
    """max-pooled accumulator of a binary conv, one popcount loop per pool phase."""
    kh, kw = layer.weight_shape[:2]
    k = layer.pool
    words = binary.pack_activation_bits(x)
    out = None
    for di in range(k):
        for dj in range(k):
            pc = binary.conv_popcount(words, p["w"], kh, kw, layer.stride, layer.padding, k, (di, dj))
            hp, wp = pc.shape[1:3]
            acc = p["b"][di:di + k * (hp - 1) + 1:k, dj:dj + k * (wp - 1) + 1:k] - 2 * pc
            out = acc if out is None else jnp.maximum(out, acc)
    return out


def _max_pool(y, k: int):
    """Elementwise max of the k*k strided views: fuses with the output stage, unlike a
    reduction over reshaped axes (XLA loops that one slowly)."""
    _, h, w, _ = y.shape
    ho, wo = h // k, w // k
    out = None
    for i in range(k):
        for j in range(k):
            v = y[:, i:i + k * (ho - 1) + 1:k, j:j + k * (wo - 1) + 1:k, :]
            out = v if out is None else jnp.maximum(out, v)
    return out


def _output(layer, p, y):
    if layer.output == "requant_relu":
        offset = OFFSET if layer.a_bits == 8 else 0
        return requant.requant_relu_int8(y, p["m"], p["s"], layer.a_bits, offset)
    if layer.output == "sign":
        return jnp.where(y >= 0, jnp.int8(1), jnp.int8(-1))
    return requant.requant_out(y, p["m"], p["s"])


def _layer(layer, p, x, with_stats: bool = False):
    """One layer -> (next operand, largest |acc| before pooling or None)."""
    if layer.binary and layer.kind == "conv" and layer.pool and not with_stats:
        return _output(layer, p, _binary_conv_pooled(layer, p, x)), None
    acc = _dot(layer, p, x) + p["b"]
    y = _max_pool(acc, layer.pool) if layer.pool else acc
    return _output(layer, p, y), (jnp.max(jnp.abs(acc)) if with_stats else None)


def _forward(layers, pad_value, with_stats: bool, params, images):
    del pad_value                        # folded into the first layer's bias by prepare()
    x = _pixels_int8(images)
    stats = []
    for layer, p in zip(layers, params):
        x, stat = _layer(layer, p, x, with_stats)
        stats.append(stat)
    return (x, jnp.stack(stats)) if with_stats else x


@functools.lru_cache(maxsize=64)
def _compiled(layers, pad_value, with_stats: bool):
    return jax.jit(functools.partial(_forward, layers, pad_value, with_stats))


def check_images(artifact, images) -> None:
    """Raise ValueError unless `images` is uint8 [N >= 1, H, W, C] matching the artifact's input."""
    dtype = getattr(images, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got dtype {dtype}")
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != tuple(artifact.input_shape):
        raise ValueError(f"images must have shape [N, {', '.join(map(str, artifact.input_shape))}] "
                         f"(NHWC), got {list(shape)}")
    if shape[0] == 0:
        raise ValueError("images: empty batch (N = 0), nothing to run")


def check_batch_size(batch_size) -> None:
    """Raise ValueError unless `batch_size` is None (one call) or a positive int: 0 or a
    negative size would otherwise fail deep inside range() or silently run one batch."""
    if batch_size is None:
        return
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")


def check_labels(artifact, labels, n: int) -> np.ndarray:
    """Labels as an integer array [n] inside the artifact's classes [0, classes); a label
    outside them could never be predicted and would silently score 0."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape [{n}], got {labels.dtype} {list(labels.shape)}")
    classes = artifact.layers[-1].weight_shape[-1]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"labels must lie in [0, {classes - 1}] (the artifact has {classes} classes), "
                         f"got values in [{lo}, {hi}]")
    return labels


def run_int(artifact, images, *, batch_size: int | None = None, with_stats: bool = False):
    """int32 logits [N, classes] of uint8 `images` [N, H, W, C]; jitted, in chunks of
    `batch_size`. With `with_stats`, also the largest |acc| per layer (int32 [L])."""
    check_images(artifact, images)
    check_batch_size(batch_size)
    fn = _compiled(artifact.layers, artifact.pad_value, with_stats)
    params = prepare(artifact)
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


def evaluate(artifact, images, labels, *, batch_size: int | None = 1000) -> dict:
    """Top-1 accuracy of the artifact (argmax of int32 logits, ties -> lowest index)
    plus per-layer accumulator extremes against their static bounds."""
    check_images(artifact, images)
    check_batch_size(batch_size)
    labels = check_labels(artifact, labels, images.shape[0])
    logits, acc_max = run_int_with_stats(artifact, images, batch_size=batch_size)
    pred = np.argmax(np.asarray(logits), axis=-1)
    correct = int(np.sum(pred == labels))
    n = int(labels.shape[0])
    names = [layer.name for layer in artifact.layers]
    acc_max = [int(v) for v in np.asarray(acc_max)]
    bounds = [row["bound"] for row in overflow_bounds(artifact)]
    return {
        "top1": correct / n, "n": n, "correct": correct,
        "max_abs_acc": dict(zip(names, acc_max)),
        "acc_bound": dict(zip(names, bounds)),
        "observed_headroom_bits": {k: 31 - v.bit_length() for k, v in zip(names, acc_max)},
    }
