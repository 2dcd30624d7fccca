"""Inference throughput on alexnet_cifar (project venv, with onnxruntime installed).

Ours: the integer interpreter (`run_int`) on W8A8 and W4A4 artifacts exported from a
random-init student (`integerize` + `write_artifact`), and the fake-quant Flax student.
Peers: ONNX Runtime on the same architecture and float weights, fp32 and statically
quantised to int8 (QOperator and QDQ formats, random calibration). ORT models take
normalised float32 NCHW (the normalisation is done outside the timing); ours take uint8.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _artifacts import MEAN, SHAPE, STD, export  # noqa: E402
from _onnx import float_onnx, onnx_input  # noqa: E402
from _common import emit, machine, rate, time_per_call  # noqa: E402
from bnfree_jax.intsim import load_artifact, run_int  # noqa: E402


def quantize(src: str, dst: str, fmt: str, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False)


def ort_rate(path: str, x: np.ndarray, threads: int, repeats: int, inner: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    t, _ = time_per_call(lambda: sess.run(["logits"], {"input": x}), repeats=repeats, inner=inner)
    return rate(len(x), t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    out = {"bench": "int_inference", "batch": args.batch, "model": "alexnet_cifar"}
    with tempfile.TemporaryDirectory() as tmp:
        for w, a in ((8, 8), (4, 4)):
            d = os.path.join(tmp, f"w{w}a{a}")
            _, specs, net, params = export(d, w, a)
            art = load_artifact(d)
            t, _ = time_per_call(lambda: jax.block_until_ready(run_int(art, images)), repeats=args.repeats, inner=args.inner)
            out[f"intsim_w{w}a{a}_images_per_s"] = rate(args.batch, t)
            fq = jax.jit(lambda p, x: net.apply({"params": p}, x))
            t, _ = time_per_call(lambda: jax.block_until_ready(fq(params, images)), repeats=args.repeats, inner=args.inner)
            out[f"flax_fakequant_w{w}a{a}_images_per_s"] = rate(args.batch, t)
        fp32 = os.path.join(tmp, "fp32.onnx")
        float_onnx(specs, params, [1.0 / s for s in STD], SHAPE, fp32)
        z = np.round(255 * np.asarray(MEAN))
        x = onnx_input(images, z)
        calib = onnx_input(rng.integers(0, 256, (128, *SHAPE), dtype=np.uint8), z)
        out["ort_fp32_images_per_s"] = ort_rate(fp32, x, args.threads, args.repeats, args.inner)
        for fmt in ("qoperator", "qdq"):
            q = os.path.join(tmp, f"{fmt}.onnx")
            quantize(fp32, q, fmt, calib)
            out[f"ort_int8_{fmt}_images_per_s"] = ort_rate(q, x, args.threads, args.repeats, args.inner)
    best = max(out["ort_int8_qoperator_images_per_s"], out["ort_int8_qdq_images_per_s"])
    out["intsim_vs_ort_int8"] = round(out["intsim_w8a8_images_per_s"] / best, 3)
    out.update(onnxruntime=ort.__version__, jax=jax.__version__, ort_threads=args.threads, machine=machine())
    emit(out)


if __name__ == "__main__":
    main()
