"""Post-training quantization, ours against ONNX Runtime, on one float BN teacher.

The float teacher (trained in --workdir when absent, as `bnfree run` would) has its BN
folded (pipeline.ptq.fold_float_teacher) and is written as a float NCHW ONNX graph;
ONNX Runtime's `quantize_static` (QDQ, QInt8 weights, QUInt8 activations, per tensor and
per channel) quantizes it with its MinMax, Entropy and Percentile calibrators, and
`bnfree ptq`'s logic (through `bnfree ptq-sweep`'s rows: requant layer = per tensor,
channel = per channel) calibrates the matching method, all on the same N training
images. Both are evaluated on the evaluation split (MNIST's 10,000 test images). Ours
keeps the integer-only constraint (zero-point 0, one dyadic requantisation per layer);
ORT's QDQ graph keeps float scales and uint8 zero-points.

    python bench/ptq_vs_ort.py [--workdir DIR] [--calib-images 256] [KEY=VALUE ...]

Last line: {"calib_images": N, "float_top1": x, "w8a8_per_tensor": {"minmax": {"ours": a,
"ort": b}, "entropy": {...}, "percentile": {...}}, "w8a8_per_channel": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from _onnx import float_onnx, onnx_input  # noqa: E402


METHODS = ("minmax", "entropy", "percentile")
GRANULARITY = {"layer": "w8a8_per_tensor", "channel": "w8a8_per_channel"}


def ort_quantize(src: str, dst: str, batches, method: str, per_channel: bool, percentile: float) -> None:
    """ORT's quantize_static: QDQ, QInt8 weights, QUInt8 activations, on `batches` (a list of inputs)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=per_channel, calibrate_method=calib,
                    extra_options={"CalibPercentile": percentile} if method == "percentile" else None)


def ort_top1(path: str, x: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0].argmax(-1)
                           for i in range(0, len(x), batch)])
    return float(np.mean(pred == labels))


def sweep_config(config, n: int, seed: int, percentile: float):
    """The job's config with the calibration sweep's grid of this comparison."""
    import ml_collections

    c = ml_collections.ConfigDict(config.to_dict())
    c.ptq_sweep = dict(methods=list(METHODS), percentiles=[percentile], bits=["w8a8"], images=[n],
                       requant=list(GRANULARITY), samples=[seed], weight_calib="minmax")
    return c


def ours(rows, n: int, seed: int, percentile: float) -> dict:
    """{requant: {method: integer top-1}} of the sweep's rows of this comparison."""
    out: dict = {}
    for r in rows:
        if (r["images"], r["sample"], r["w_bits"], r["a_bits"]) == (n, seed, 8, 8) and \
                r["method"] in METHODS and (r["method"] != "percentile" or r["percentile"] == percentile):
            out.setdefault(r["requant"], {})[r["method"]] = r["top1"]
    return out


def result(a) -> dict:
    from bnfree_jax.nn.network import STUDENT
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.pipeline.ledger import Ledger
    from bnfree_jax.pipeline.ptq import fold_float_teacher
    from bnfree_jax.pipeline.ptq_sweep import run_ptq_sweep, sub_config
    from bnfree_jax.pipeline.teacher import run_teacher_phases
    from bnfree_jax.pipeline.validate import load_valid_config

    log = lambda m: print(m, file=sys.stderr, flush=True)
    workdir = a.workdir or tempfile.mkdtemp(prefix="ptq_vs_ort_")
    c = sweep_config(load_valid_config(a.config, a.overrides), a.calib_images, a.calib_seed, a.percentile)
    ours_top1 = ours(run_ptq_sweep(c, workdir, log=log), a.calib_images, a.calib_seed, a.percentile)
    sub = os.path.join(workdir, "w8a8_layer")
    ctx = make_context(sub_config(c, "w8a8", "layer"), sub, log=log)
    ledger = Ledger(sub)
    float_vars, _ = run_teacher_phases(ctx, ledger, qat=False)  # the sweep trained it: loaded
    net = ctx.nets.network(STUDENT)
    tmp = tempfile.mkdtemp(prefix="ptq_vs_ort_onnx_")
    src = os.path.join(tmp, "float.onnx")
    float_onnx(ctx.nets.specs(quantized=False), fold_float_teacher(ctx.nets, float_vars), net.inv_std,
               ctx.nets.image_shape, src)
    calib = [onnx_input(b, net.zero_point) for b in ctx.feed.sample_batches(a.calib_images, a.calib_seed)()]
    images, labels = ctx.feed.eval_arrays()
    x = onnx_input(images, net.zero_point)
    out = {"calib_images": a.calib_images, "float_top1": ledger.get("teacher")["top1"]}
    log(f"[ptq_vs_ort] float teacher {out['float_top1']:.4f}; its folded float ONNX graph {ort_top1(src, x, labels):.4f}")
    for requant, key in GRANULARITY.items():
        out[key] = {}
        for m in METHODS:
            dst = os.path.join(tmp, f"{m}_{requant}.onnx")
            ort_quantize(src, dst, calib, m, requant == "channel", a.percentile)
            out[key][m] = {"ours": ours_top1[requant][m], "ort": ort_top1(dst, x, labels)}
            log(f"[ptq_vs_ort] {key} {m}: ours {out[key][m]['ours']:.4f}  ort {out[key][m]['ort']:.4f}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mnist_alexnet.py:w8a8")
    ap.add_argument("--workdir", default="", help="where the teacher and calibrations live (default: a temp dir)")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--percentile", type=float, default=99.999, help="both sides' percentile (ORT's default)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    print(json.dumps(result(ap.parse_args(argv))), flush=True)  # the key order, not sorted


if __name__ == "__main__":
    main()
