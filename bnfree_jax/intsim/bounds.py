"""Static int32 accumulator bounds, recomputed from the decoded artifact tensors."""

from __future__ import annotations

import numpy as np

INT32_MAX = 2**31 - 1


def overflow_bounds(artifact) -> list[dict]:
    """Per layer: K, max|w|, max|x|, max|bias|, bound = K*max|w|*max|x| + max|bias|,
    headroom_bits = 31 - bit_length(bound) (spare bits below 2^31), and `safe`."""
    rows = []
    for layer, w, b in zip(artifact.layers, artifact.weights, artifact.biases):
        k = int(np.prod(w.shape[:-1]))
        max_w = int(np.abs(w.astype(np.int64)).max())
        max_b = int(np.abs(b.astype(np.int64)).max())
        bound = k * max_w * layer.in_max + max_b
        rows.append({"name": layer.name, "k": k, "max_abs_w": max_w, "max_abs_x": layer.in_max,
                     "max_abs_bias": max_b, "bound": bound, "headroom_bits": 31 - bound.bit_length(),
                     "safe": bound <= INT32_MAX})
    return rows
