"""Weight quantisers of the two roles.

The teacher uses DoReFa's tanh normalisation on the narrow symmetric grid
(`quant.symmetric_weight`). The student uses plain max-abs scaling, which is
scale-equivariant (Q(k·w) = k·Q(w) for k > 0 at the granularity of the scale): that is
what makes folding BN into the student exact at per-channel granularity, and it means
a student initialised from the teacher's dequantised weights reproduces its codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax import quant


def along_input(per_channel, kernel_shape) -> np.ndarray:
    """Per-input-channel values (1/std, the input zero point) as a column [K_in, 1] that
    scales a kernel's input axis: HWIO's I as is; a dense kernel reads the flattened NHWC
    input, whose row k = (h·W + w)·C + c is channel k mod C."""
    v = np.asarray(per_channel)
    if len(kernel_shape) == 2:
        v = np.tile(v, kernel_shape[0] // v.size)
    return v[:, None]


def reduce_axes(ndim: int, per_channel: bool) -> tuple[int, ...] | None:
    """Axes reduced for the scale: all but the output channel (last) when per channel."""
    return tuple(range(ndim - 1)) if per_channel else None


def maxabs_scale(w: jnp.ndarray, bits: int, per_channel: bool) -> jnp.ndarray:
    """The student's weight scale: max|w|/qmax (b ≥ 2) or mean|w| (b = 1), no gradient."""
    axes = reduce_axes(w.ndim, per_channel)
    keep = per_channel
    if bits == 1:
        s = jnp.mean(jnp.abs(w), axis=axes, keepdims=keep)
    else:
        s = jnp.max(jnp.abs(w), axis=axes, keepdims=keep) / (2 ** (bits - 1) - 1)
    return jax.lax.stop_gradient(jnp.maximum(s, 1e-8))


@quant.in_float32
def student_weight(w: jnp.ndarray, bits: int, per_channel: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Fake-quantised student weights and their scale (codes = weights / scale)."""
    scale = maxabs_scale(w, bits, per_channel)
    if bits == 1:
        return quant.sign_ste(w) * scale, scale
    return quant.uniform_quantize(w, scale, bits, signed=True), scale


@quant.in_float32
def student_codes(w: jnp.ndarray, bits: int, per_channel: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Integer codes (int32) and scale of the student's weights, for export."""
    fake, scale = student_weight(w, bits, per_channel)
    return jnp.round(fake / scale).astype(jnp.int32), scale


def teacher_weight(w: jnp.ndarray, bits: int, per_channel: bool) -> jnp.ndarray:
    """Fake-quantised teacher weights (DoReFa tanh normalisation, narrow symmetric grid)."""
    return quant.symmetric_weight(w, bits, channel_axis=-1 if per_channel else None)
