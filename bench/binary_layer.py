"""Binary (XOR + popcount) layers vs int8 and float32 layers of the same shapes, and
the whole W1A1 vs W8A8 alexnet_cifar student in the interpreter (project venv).

Layers: conv 3x3 256->256 on 8x8x256, batch 64, SAME; dense 4096->4096, batch 64.
Binary uses the interpreter's own kernels (`bnfree_jax.intsim.binary`), weights pre-packed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from _artifacts import export  # noqa: E402
from _common import emit, machine, rate, time_per_call  # noqa: E402
from bnfree_jax.intsim import binary, load_artifact, run_int  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
PAD = [[1, 1], [1, 1]]


def _rate(fn, args, batch, repeats, inner):
    f = jax.jit(fn)
    t, _ = time_per_call(lambda: jax.block_until_ready(f(*args)), repeats=repeats, inner=inner)
    return rate(batch, t)


def conv_rates(batch, repeats, inner):
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([-1, 1], np.int8), (batch, 8, 8, 256))
    w = rng.choice(np.array([-1, 1], np.int8), (3, 3, 256, 256))
    wpk = jnp.asarray(binary.pack_weight_bits(w))
    xb, xi, wi = jnp.asarray(x), jnp.asarray(x), jnp.asarray(w)
    ref = lax.conv_general_dilated(xi, wi, (1, 1), PAD, dimension_numbers=DN, preferred_element_type=jnp.int32)
    got = binary.binary_conv(xb, wpk, 3, 3, 1, PAD)
    assert np.array_equal(np.asarray(got), np.asarray(ref)), "binary conv disagrees with the int8 conv"
    return {
        "binary": _rate(lambda a, b: binary.binary_conv(a, b, 3, 3, 1, PAD), (xb, wpk), batch, repeats, inner),
        "int8": _rate(lambda a, b: lax.conv_general_dilated(a, b, (1, 1), PAD, dimension_numbers=DN,
                                                            preferred_element_type=jnp.int32), (xi, wi), batch, repeats, inner),
        "float32": _rate(lambda a, b: lax.conv_general_dilated(a, b, (1, 1), PAD, dimension_numbers=DN),
                         (xi.astype(jnp.float32), wi.astype(jnp.float32)), batch, repeats, inner)}


def dense_rates(batch, repeats, inner):
    rng = np.random.default_rng(1)
    x = rng.choice(np.array([-1, 1], np.int8), (batch, 4096))
    w = rng.choice(np.array([-1, 1], np.int8), (4096, 4096))
    wpk = jnp.asarray(binary.pack_weight_bits(w))
    xi, wi = jnp.asarray(x), jnp.asarray(w)
    dot = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    assert np.array_equal(np.asarray(binary.binary_dense(xi, wpk)), np.asarray(dot(xi, wi)))
    return {"binary": _rate(binary.binary_dense, (xi, wpk), batch, repeats, inner),
            "int8": _rate(dot, (xi, wi), batch, repeats, inner),
            "float32": _rate(lambda a, b: a @ b, (xi.astype(jnp.float32), wi.astype(jnp.float32)), batch, repeats, inner)}


def student_rates(batch, repeats, inner):
    images = np.random.default_rng(2).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w, a in ((1, 1), (8, 8)):
            d = os.path.join(tmp, f"w{w}a{a}")
            export(d, w, a)
            art = load_artifact(d)
            t, _ = time_per_call(lambda: jax.block_until_ready(run_int(art, images)), repeats=repeats, inner=inner)
            out[f"w{w}a{a}"] = rate(batch, t)
            out[f"w{w}a{a}_binary_layers"] = sum(layer.binary for layer in art.layers)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3)
    args = ap.parse_args(argv)
    conv = conv_rates(args.batch, args.repeats, args.inner)
    dense = dense_rates(args.batch, args.repeats, args.inner)
    student = student_rates(256, args.repeats, 2)
    emit({"bench": "binary_layer", "batch": args.batch,
          "conv3x3_256_8x8_images_per_s": conv, "dense_4096_images_per_s": dense,
          "student_images_per_s": student,
          "binary_vs_int8_layer": round(conv["binary"] / conv["int8"], 3),
          "binary_vs_int8_dense": round(dense["binary"] / dense["int8"], 3),
          "w1a1_vs_w8a8_student": round(student["w1a1"] / student["w8a8"], 3),
          "jax": jax.__version__, "machine": machine()})


if __name__ == "__main__":
    main()
