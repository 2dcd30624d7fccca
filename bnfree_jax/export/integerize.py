"""Turn a fake-quant student into integer layers for the artifact.

Per layer, with input codes at scale s_x, weight codes at scale s_w and IntScale (α, β):
    pre = r·(acc + β/r),   r = α·s_x·s_w   (per tensor, or per channel)
so the int32 bias is round(β/r) and the output stage multiplies by r/s_out, a dyadic
M·2^-shift. A negative α (possible per channel) flips that channel's weight codes so
every multiplier is positive and the output stage stays monotone (max-pool commutes).
For sign layers the bias is floor(β/r): `acc + bias ≥ 0 ⇔ pre ≥ 0` holds exactly.

Weight codes and scales are read through `quant.check_on_grid` from the layer's registered
weight quantizer on the trained weights, and its activation quantizer is run on a probe
(`activation_probe`): a quantizer whose forward leaves the integer grid is refused, one
line naming it and the layer, before anything is written.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax import quant
from bnfree_jax.nn.network import input_zero_point
from bnfree_jax.nn.weights import along_input, student_codes

MULT_BITS = 30  # multipliers in [2^29, 2^30): 30 significant bits, int32-safe
PROBE_SIZE = 4097  # values in an activation quantizer's probe


def dyadic(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, shift) with M·2^-shift ≈ m (> 0), M < 2^30, shift in [0, 62]."""
    m = np.atleast_1d(np.asarray(m, np.float64))
    if np.any(m <= 0) or not np.all(np.isfinite(m)):
        raise ValueError(f"requantisation scale must be positive and finite, got {m}")
    e = np.floor(np.log2(m)).astype(np.int64)
    shift = np.clip(MULT_BITS - 1 - e, 0, 62)
    M = np.round(m * np.exp2(shift.astype(np.float64))).astype(np.int64)
    over = M >= 2 ** MULT_BITS
    M = np.where(over, np.round(M / 2), M)
    shift = np.where(over, shift - 1, shift)
    if np.any(M < 1) or np.any(shift < 0):
        raise ValueError(f"requantisation scale {m} is not representable")
    return M.astype(np.int32), shift.astype(np.int32)


def same_padding(in_hw, kernel: int, stride: int, padding: str):
    pads = jax.lax.padtype_to_pads(tuple(in_hw), (kernel, kernel), (stride, stride), padding)
    return [[int(a), int(b)] for a, b in pads]


def activation_probe(alpha: float, bits: int) -> np.ndarray:
    """A [1, PROBE_SIZE] batch of what an activation quantizer sees: at 1 bit pre-ReLU
    values around 0, at 2+ bits post-ReLU values from 0 to 2·alpha (grid points, ties and
    the clipped range). Synthetic: integerize sees no images."""
    hi = 2.0 if bits == 1 else 2.0 * alpha
    lo = -hi if bits == 1 else 0.0
    return np.linspace(lo, hi, PROBE_SIZE, dtype=np.float32)[None]


def check_activation(spec, alpha: float) -> None:
    """Refuse (quant.OffGridError, naming it and the layer) an activation quantizer whose
    forward on `activation_probe` leaves the grid the artifact's output stage writes."""
    bits = spec.a_bits
    alpha = np.float32(1.0 if bits == 1 else alpha)
    quant.check_on_grid("activation", spec.act_quantizer, jnp.asarray(activation_probe(alpha, bits)),
                        jnp.asarray(alpha), bits, layer=spec.name)


def integerize(specs, params: dict, mean, std, image_shape, per_channel: bool) -> tuple[list, dict]:
    """Integer layers (write_artifact's format) and the input spec, from student params."""
    z = input_zero_point(mean)
    layers, hw = [], tuple(image_shape[:2])
    s_x = 1.0 / 255.0
    for i, spec in enumerate(specs):
        p = params[spec.name]
        kernel = jnp.asarray(p["kernel"])
        if i == 0:
            inv_std = along_input(np.asarray([float(1.0 / s) for s in std]), kernel.shape)
            kernel = kernel * jnp.asarray(inv_std, jnp.float32)
        codes, s_w = student_codes(kernel, spec.w_bits, per_channel, spec.weight_quantizer,
                                   layer=spec.name)
        codes = np.asarray(codes, np.int64)
        s_w = np.broadcast_to(np.asarray(s_w, np.float64).reshape(-1), (spec.features,))
        alpha = np.broadcast_to(np.asarray(p["alpha"], np.float64).reshape(-1), (spec.features,))
        beta = np.asarray(p["beta"], np.float64)
        sgn = np.where(alpha < 0, -1, 1)
        codes = codes * sgn
        r = np.abs(alpha) * s_x * s_w
        if spec.kind == "conv":
            padding = same_padding(hw, spec.kernel, spec.stride, spec.padding)
        layer = {"name": spec.name, "kind": spec.kind, "w_bits": spec.w_bits, "pool": spec.pool or None}
        if spec.last:
            s_out = r.max()
            M, sh = dyadic(r / s_out)
            bias = np.round(beta / r)
            layer.update(output="requant_out")
            s_next = s_out
        elif spec.a_bits == 1:
            check_activation(spec, 1.0)
            bias = np.floor(beta / r)
            M, sh = np.ones(1, np.int32), np.zeros(1, np.int32)
            layer.update(output="sign")
            s_next = 1.0
        else:
            check_activation(spec, float(p["act_alpha"]))
            s_a = float(p["act_alpha"]) / (2 ** spec.a_bits - 1)
            M, sh = dyadic(r / s_a)
            bias = np.round(beta / r)
            layer.update(output="requant_relu", a_bits=spec.a_bits)
            s_next = s_a
        if i == 0:  # padding holds pixel z: acc(p) − Σ z·w equals acc(p − z)
            z_in = along_input(z.astype(np.int64), codes.shape)
            bias = bias - (codes * z_in).sum(axis=tuple(range(codes.ndim - 1)))
        if np.all(M == M[0]) and np.all(sh == sh[0]):
            M, sh = M[:1], sh[:1]
        if spec.kind == "conv":
            layer.update(stride=spec.stride, padding=padding)
            hw = _out_hw(hw, padding, spec.kernel, spec.stride, spec.pool)
        layer.update(weight=codes.astype(np.int8), bias=bias.astype(np.int64).astype(np.int32),
                     multiplier=M.astype(np.int32), shift=sh.astype(np.int32))
        layers.append(layer)
        s_x = s_next
    return layers, {"shape": [int(v) for v in image_shape], "pad_value": [int(v) for v in z]}


def _out_hw(hw, padding, k: int, stride: int, pool: int):
    h = (hw[0] + sum(padding[0]) - k) // stride + 1
    w = (hw[1] + sum(padding[1]) - k) // stride + 1
    if pool:
        h, w = h // pool, w // pool
    return h, w

