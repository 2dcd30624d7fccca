"""The weights of the two roles, quantised by registered quantizers (`bnfree_jax.quant`).

nn/ holds no quantizer of its own: the teacher uses `TEACHER_WEIGHT_QUANTIZER` (DoReFa's
tanh normalisation on the narrow symmetric grid); the student uses its layer's
`weight_quantizer`, by default `maxabs`: plain max-abs scaling, which is
scale-equivariant (Q(k·w) = k·Q(w) for k > 0 at the granularity of the scale): that is
what makes folding BN into the student exact at per-channel granularity, and it means
a student initialised from the teacher's dequantised weights reproduces its codes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bnfree_jax import quant
from bnfree_jax.nn.zoo import DEFAULT_WEIGHT_QUANTIZER

# DoReFa's tanh normalisation on the narrow symmetric grid (`quant.symmetric_weight`).
TEACHER_WEIGHT_QUANTIZER = "dorefa_tanh"


def along_input(per_channel, kernel_shape) -> np.ndarray:
    """Per-input-channel values (1/std, the input zero point) as a column [K_in, 1] that
    scales a kernel's input axis: HWIO's I as is; a dense kernel reads the flattened NHWC
    input, whose row k = (h·W + w)·C + c is channel k mod C."""
    v = np.asarray(per_channel)
    if len(kernel_shape) == 2:
        v = np.tile(v, kernel_shape[0] // v.size)
    return v[:, None]


def channel_axis(per_channel: bool):
    """The registry's `axis`: the output channel (last, HWIO / [in, out]) or None per tensor."""
    return -1 if per_channel else None


def student_weight(w: jnp.ndarray, bits: int, per_channel: bool,
                   quantizer: str = DEFAULT_WEIGHT_QUANTIZER) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Fake-quantised student weights and their scale, by the registered `quantizer`."""
    return quant.weight_quantizer(quantizer)(w, bits, channel_axis(per_channel))


def student_codes(w: jnp.ndarray, bits: int, per_channel: bool,
                  quantizer: str = DEFAULT_WEIGHT_QUANTIZER,
                  layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (int32) and scale of the student's weights, for export.

    Read through `quant.check_on_grid` on float32 weights (so the codes never depend on
    the compute dtype), which refuses, naming `quantizer` and `layer`, a forward that
    leaves the grid; the scale comes back in the dtype of `w`."""
    dtype = jnp.asarray(w).dtype
    qt = quant.check_on_grid("weight", quantizer, jnp.asarray(w, jnp.float32), bits,
                             channel_axis(per_channel), layer=layer)
    return np.asarray(qt.codes, np.int32), jnp.asarray(qt.scale).astype(dtype)


def teacher_weight(w: jnp.ndarray, bits: int, per_channel: bool) -> jnp.ndarray:
    """Fake-quantised teacher weights, by the registered `TEACHER_WEIGHT_QUANTIZER`."""
    return quant.weight_quantizer(TEACHER_WEIGHT_QUANTIZER)(w, bits, channel_axis(per_channel))[0]
