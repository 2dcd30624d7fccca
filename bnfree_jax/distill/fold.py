"""Student initialisation by folding the QAT teacher's BN (baseline (a), and PTL's start).

BN in inference mode is a per-channel affine map y = k·z + b with k = γ/√(σ²+ε),
b = β − μ·k. Under `requant="channel"` the student's per-channel α takes k and its β takes
b: exact. Under `requant="layer"` (one α per layer) k must go into the weights, which the
student's per-tensor quantiser then re-rounds: the folding error PTL exists to repair.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bnfree_jax.nn.weights import along_input, teacher_weight

BN_EPS = 1e-5


def bn_affine(params: dict, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(k, b) of an inference-mode BN layer."""
    k = np.asarray(params["scale"]) / np.sqrt(np.asarray(stats["var"]) + BN_EPS)
    return k, np.asarray(params["bias"]) - np.asarray(stats["mean"]) * k


def teacher_effective_weight(spec, layer_params: dict, inv_std, per_channel: bool) -> np.ndarray:
    """The teacher's dequantised weights as its forward pass uses them (first layer: ×1/std)."""
    w = jnp.asarray(layer_params["kernel"])
    if inv_std is not None:
        w = w * jnp.asarray(along_input(inv_std, w.shape), w.dtype)
    if spec.quantized:
        w = teacher_weight(w, spec.w_bits, per_channel)
    return np.asarray(w)


def fold_layer(spec, t_params: dict, t_stats: dict | None, inv_std, per_channel: bool) -> dict:
    """Student parameters of one layer, folded from the teacher's."""
    w = teacher_effective_weight(spec, t_params, inv_std, per_channel)
    feats = spec.features
    if spec.last:
        k, b = np.ones(feats, np.float32), np.asarray(t_params["bias"])
    else:
        k, b = bn_affine(t_params["bn"], t_stats["bn"])
    if per_channel:
        alpha = k.astype(np.float32)
    else:
        w = w * k  # broadcast over the output-channel (last) axis
        alpha = np.float32(1.0)
    if inv_std is not None:
        w = w / along_input(np.asarray(inv_std, np.float32), w.shape)
    out = {"kernel": w.astype(np.float32), "alpha": np.asarray(alpha, np.float32),
           "beta": b.astype(np.float32)}
    if "act_alpha" in t_params:
        out["act_alpha"] = np.asarray(t_params["act_alpha"], np.float32)
    return out


def fold_student(net, teacher_vars: dict) -> dict:
    """Student params {layer: {kernel, alpha, beta[, act_alpha]}} folded from a BN teacher."""
    out = {}
    for i, spec in enumerate(net.specs):
        t_p = teacher_vars["params"][spec.name]
        t_s = teacher_vars.get("batch_stats", {}).get(spec.name)
        out[spec.name] = fold_layer(spec, t_p, t_s, net.inv_std if i == 0 else None, net.per_channel)
    return out
