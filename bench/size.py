"""Artifact size vs float32 parameters and vs the ideal packed size, alexnet_cifar.

Every layer (first and last included) at b bits, b = 1, 2, 4, 8; ideal = Σ params·b/8 +
4·(#bias + #multiplier + #shift). Prints JSON; `artifact_vs_ideal_size` is the worst ratio.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from _artifacts import export  # noqa: E402
from _common import emit, machine  # noqa: E402


def main():
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (1, 2, 4, 8):
            d = os.path.join(tmp, f"w{bits}")
            manifest, specs, _, params = export(d, bits, bits, first_last=bits)
            tfile = os.path.getsize(os.path.join(d, "model.safetensors"))
            total = tfile + os.path.getsize(os.path.join(d, "manifest.json"))
            ideal = 0.0
            for layer in manifest["layers"]:
                n_w = int(np.prod(layer["weight_shape"]))
                consts = sum(int(np.prod(manifest["tensors"][layer["tensors"][k]]["shape"]))
                             for k in ("bias", "multiplier", "shift"))
                ideal += n_w * layer["w_bits"] / 8 + 4 * consts
            float_bytes = 4 * sum(int(np.prod(np.shape(p[k]))) for p in params.values()
                                  for k in ("kernel", "beta"))
            rows[bits] = {"tensors_file_bytes": tfile, "artifact_dir_bytes": total, "ideal_bytes": round(ideal, 1),
                          "float32_param_bytes": float_bytes, "vs_ideal": round(tfile / ideal, 4),
                          "compression_vs_float32": round(float_bytes / tfile, 2)}
    emit({"bench": "size", "model": "alexnet_cifar", "per_bits": rows,
          "artifact_vs_ideal_size": max(r["vs_ideal"] for r in rows.values()), "machine": machine()})


if __name__ == "__main__":
    main()
