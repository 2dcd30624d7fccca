"""Activation clips set by calibration: each layer's `act_alpha` from a streaming
calibrator over what its activation quantizer sees, layer by layer in order, so layer ℓ is
measured on the output of layers < ℓ already quantized with their calibrated clips.

Used by `bnfree ptq` (the BN-free student folded from the float teacher) and by
`model.act_init` given as a calibrator name (the QAT teacher's clips at the start of QAT,
the scratch student's at its initialisation).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import numpy as np

from bnfree_jax import quant
from bnfree_jax.nn.network import record_quantizer_inputs

ACT_INIT_IMAGES = 256  # training images behind clips started by calibration (model.act_init=NAME)


def make_calibrator(method: str, percentile: Optional[float] = None) -> Callable[[int], quant.StreamingCalibrator]:
    """bits -> the streaming calibrator of one activation (unsigned: post-ReLU, per tensor)."""
    extra = {"percentile": percentile} if method == "percentile" and percentile is not None else {}
    return lambda bits: quant.StreamingCalibrator(method, bits, signed=False, axis=None, **extra)


@functools.lru_cache(maxsize=128)  # one compilation per (network, layer): a sweep calibrates one net hundreds of times
def _quantizer_input_fn(net, index: int, name: str, batch_stats: bool):
    """jit(variables, images) -> what layer `index`'s activation quantizer sees; with
    `batch_stats`, BN normalises by the batch's statistics (as in training) and its
    running averages are left as they were."""
    @jax.jit
    def f(variables, images):
        with record_quantizer_inputs() as found:
            if batch_stats:
                net.apply(variables, images, train=True, stop=index + 1, mutable=["batch_stats"])
            else:
                net.apply(variables, images, stop=index + 1)
        return found[name][0]
    return f


def calibrate_clips(net, variables: dict, batches, calibrator: Callable) -> tuple[dict, dict]:
    """(variables with every `act_alpha` calibrated, {layer: act_alpha}).

    `batches()` yields uint8 image batches afresh on each call (one pass per layer: no
    pass holds all activations); `calibrator(bits)` is a fresh streaming calibrator. A
    layer whose input is all zeros keeps a positive clip (quant.SCALE_FLOOR).

    A BN network (variables with `batch_stats`) is calibrated as its training steps will
    see it: BN normalising by each batch's statistics. Its running averages are the float
    teacher's, which do not fit the quantized weights: in evaluation mode at QAT's start
    the inputs of a W4A4 alexnet_mini grow ~4x a layer (fc7's clip measured at 2e4)."""
    params = {k: dict(v) for k, v in variables["params"].items()}
    variables = {**variables, "params": params}
    alphas = {}
    for i, spec in enumerate(net.specs):
        if "act_alpha" not in params.get(spec.name, {}):
            continue
        fn = _quantizer_input_fn(net, i, spec.name, "batch_stats" in variables)
        cal = calibrator(spec.a_bits)
        for images in batches():
            cal.update(np.asarray(fn(variables, images)))
        amax = np.float32(max(float(cal.compute_amax()), quant.SCALE_FLOOR))
        params[spec.name]["act_alpha"] = amax
        alphas[spec.name] = float(amax)
    return variables, alphas


def calibrated_clips(net, variables: dict, feed, method: str, seed: int) -> tuple[dict, dict]:
    """(variables, record {method, images, act_alpha}): `calibrate_clips` on ACT_INIT_IMAGES
    training images drawn by `seed` (all of them when the split is smaller)."""
    n = min(ACT_INIT_IMAGES, len(feed.train_source))
    variables, alphas = calibrate_clips(net, variables, feed.sample_batches(n, seed), make_calibrator(method))
    return variables, {"method": method, "images": n, "act_alpha": alphas}


def clips_text(alphas: dict) -> str:
    """'conv1=4.68 conv2=4.86 ...': calibrated clips as the logs print them."""
    return " ".join(f"{k}={v:.4g}" for k, v in alphas.items())
