"""Quantizers (straight-through estimators as custom_vjp), QTensor, calibrators."""
from bnfree_jax.quant.calib import METHODS, calibrate, scale_from_amax
from bnfree_jax.quant.precision import in_float32
from bnfree_jax.quant.qtensor import QTensor, qrange
from bnfree_jax.quant.ste import (approx_sign, clip_ste, round_half_away,
                                  round_ste, sign_ste)
from bnfree_jax.quant.streaming import StreamingCalibrator
from bnfree_jax.quant.uniform import (lsq_default_grad_scale, lsq_quantize,
                                      pact_quantize, scale_grad, sum_to_shape,
                                      uniform_quantize)
from bnfree_jax.quant.weights import (dorefa_activation, dorefa_weight,
                                      symmetric_weight)

__all__ = [
    "METHODS", "QTensor", "StreamingCalibrator", "approx_sign", "calibrate",
    "clip_ste", "dorefa_activation", "dorefa_weight", "in_float32", "lsq_default_grad_scale",
    "lsq_quantize", "pact_quantize", "qrange", "round_half_away", "round_ste",
    "scale_from_amax", "scale_grad", "sign_ste", "sum_to_shape",
    "symmetric_weight", "uniform_quantize",
]
