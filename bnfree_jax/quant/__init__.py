"""Quantizers (straight-through estimators as custom_jvp), their registry, QTensor, calibrators."""
from bnfree_jax.quant import builtins as _builtins  # registers the built-in quantizers
from bnfree_jax.quant.calib import METHODS, calibrate, scale_from_amax
from bnfree_jax.quant.precision import in_float32
from bnfree_jax.quant.qtensor import QTensor, qrange
from bnfree_jax.quant.registry import (OffGridError, activation_quantizer,
                                       activation_quantizers, check_on_grid,
                                       register_activation_quantizer,
                                       register_weight_quantizer, weight_quantizer,
                                       weight_quantizers)
from bnfree_jax.quant.ste import (SCALE_FLOOR, approx_sign, clip_ste, positive_scale,
                                  round_half_away, round_ste, sign_ste)
from bnfree_jax.quant.streaming import StreamingCalibrator
from bnfree_jax.quant.uniform import (lsq_default_grad_scale, lsq_quantize,
                                      pact_quantize, scale_grad, sum_to_shape,
                                      uniform_quantize)
from bnfree_jax.quant.weights import (dorefa_activation, dorefa_weight, maxabs_scale,
                                      maxabs_weight, symmetric_weight)

__all__ = [
    "METHODS", "OffGridError", "QTensor", "SCALE_FLOOR", "StreamingCalibrator",
    "activation_quantizer", "activation_quantizers", "approx_sign", "calibrate",
    "check_on_grid", "clip_ste", "dorefa_activation", "dorefa_weight", "in_float32",
    "lsq_default_grad_scale", "lsq_quantize", "maxabs_scale", "maxabs_weight",
    "pact_quantize", "positive_scale", "qrange", "register_activation_quantizer",
    "register_weight_quantizer", "round_half_away", "round_ste", "scale_from_amax",
    "scale_grad", "sign_ste", "sum_to_shape", "symmetric_weight", "uniform_quantize",
    "weight_quantizer", "weight_quantizers",
]
