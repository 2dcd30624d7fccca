"""Integer-only ONNX graph of an exported artifact, for runtimes outside JAX.

Reads only `manifest.json` + `model.safetensors` (docs/artifact-format.md) and emits
uint8 NHWC images -> int32 logits with integer ops alone: ConvInteger / MatMulInteger
(uint8 × uint8 with a weight zero point, or int8 × int8 after a sign layer; int32
accumulators), int32 bias Add, and the dyadic requantisation
`floor((acc*M + R) / 2^s)` in int64. ONNX integer Div truncates toward zero, so the floor
is taken exactly as `(v - Mod(v, 2^s)) / 2^s` (Mod with fmod=0 has the divisor's sign, so
`v - Mod(v, d)` is a multiple of d and the Div is exact). Hidden activations are uint8
codes (requant_relu) or int8 +-1 (sign); every output stage is monotone, so MaxPool runs
on those codes (ONNX MaxPool has no int32). Binary layers run as ConvInteger on +-1 int8:
ONNX has no popcount, and a +-1 multiply agrees bit for bit. `onnx` is optional and
imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from etils import epath

from bnfree_jax.export.packing import unpack_codes

OPSET = 17
IR_VERSION = 8  # accepted by every onnxruntime that knows opset 17


def _onnx():
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - exercised only without onnx
        raise ImportError("ONNX export needs the optional 'onnx' package: pip install onnx") from err
    return onnx


def read_artifact(artifact_dir) -> tuple[dict, dict]:
    """(manifest, tensors) after the format, version and sha256 checks."""
    from safetensors.numpy import load

    with epath.Path(artifact_dir, "manifest.json").open() as fh:
        manifest = json.load(fh)
    if manifest.get("format") != "bnfree-int-artifact" or manifest.get("format_version") != 1:
        raise ValueError(f"{artifact_dir}: not a version-1 bnfree integer artifact "
                         f"({manifest.get('format')!r} v{manifest.get('format_version')!r})")
    with epath.Path(artifact_dir, manifest["tensors_file"]).open("rb") as fh:
        raw = fh.read()
    if hashlib.sha256(raw).hexdigest() != manifest["tensors_sha256"]:
        raise ValueError(f"{artifact_dir}: tensors file does not match the manifest's sha256")
    return manifest, load(raw)


class _Graph:
    """Accumulates nodes and integer initializers with unique names."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.inits, self._n = onnx, [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, dtype, hint: str = "c") -> str:
        arr = np.asarray(value, dtype)
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs, hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _pad_first(g: _Graph, x: str, padding, pad_value) -> str:
    """NCHW uint8 pixels padded with the per-channel pixel value z_c (exact, no offset)."""
    (pt, pb), (pl, pr) = padding
    if pt == pb == pl == pr == 0:
        return x
    pads = g.const([0, 0, pt, pl, 0, 0, pb, pr], np.int64, "pads")
    if len(set(pad_value)) == 1:
        return g.op("Pad", [x, pads, g.const(pad_value[0], np.uint8, "z")])
    c = len(pad_value)
    parts = [g.name("chan") for _ in range(c)]
    g.nodes.append(g.onnx.helper.make_node("Split", [x, g.const([1] * c, np.int64, "split")], parts, axis=1))
    padded = [g.op("Pad", [p, pads, g.const(z, np.uint8, "z")]) for p, z in zip(parts, pad_value)]
    return g.op("Concat", padded, axis=1)


def _per_channel(g: _Graph, values, dtype, conv: bool, hint: str) -> str:
    """[O] or [1] constants broadcast over NCHW ([1, O, 1, 1]) or [N, O]."""
    v = np.asarray(values, dtype).reshape(-1)
    return g.const(v.reshape(1, -1, 1, 1) if conv else v, dtype, hint)


def _requant(g: _Graph, acc: str, mult, shift, conv: bool) -> str:
    """Exact floor((acc*M + R) / 2^s) in int64, R = 2^(s-1) (0 for s = 0)."""
    s = np.asarray(shift, np.int64).reshape(-1)
    rnd = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    den = np.left_shift(np.int64(1), s)
    v = g.op("Cast", [acc], to=g.onnx.TensorProto.INT64)
    v = g.op("Mul", [v, _per_channel(g, mult, np.int64, conv, "mult")])
    v = g.op("Add", [v, _per_channel(g, rnd, np.int64, conv, "round")])
    d = _per_channel(g, den, np.int64, conv, "den")
    v = g.op("Sub", [v, g.op("Mod", [v, d], fmod=0)])
    return g.op("Div", [v, d])


def _pool_int32(g: _Graph, acc: str, k: int, shape_hw) -> str:
    """k x k VALID max-pool of an NCHW int32 tensor via Slice + Reshape + ReduceMax."""
    h, w = shape_hw
    ho, wo = h // k, w // k
    x = g.op("Slice", [acc, g.const([0, 0], np.int64), g.const([ho * k, wo * k], np.int64),
                       g.const([2, 3], np.int64)])
    x = g.op("Reshape", [x, g.const([0, 0, ho, k, wo, k], np.int64, "shape")])
    return g.op("ReduceMax", [x], axes=[3, 5], keepdims=0)


def _weight_inputs(g: _Graph, w: np.ndarray, signed_input: bool) -> list[str]:
    """The weight operands of ConvInteger / MatMulInteger after the input. Against uint8
    inputs the int8 codes go as uint8 `w + 128` with zero point 128 (u8u8, exact): x86
    onnxruntime computes u8 × s8 with VPMADDUBSW, whose int16 pair sums saturate on CPUs
    without VNNI (its documented caveat; 255 · 127 · 2 > 2^15 - 1), so u8s8 logits there are
    wrong. Against int8 +-1 inputs (after a sign layer) they stay int8 (s8s8)."""
    if signed_input:
        return [g.const(w, np.int8, "w")]
    return [g.const(w.astype(np.int16) + 128, np.uint8, "w"), "", g.const(128, np.uint8, "w_zero_point")]


def _layer(g: _Graph, entry: dict, tensors: dict, x: str, layout: str, first: bool, pad_value,
           signed_input: bool):
    """One artifact layer on `x` (int8 when `signed_input`, else uint8) -> (output tensor
    name, its layout)."""
    tp = g.onnx.TensorProto
    keys = entry["tensors"]
    w = unpack_codes(tensors[keys["weight"]], entry["w_bits"], entry["weight_shape"]).astype(np.int8)
    conv = entry["kind"] == "conv"
    if conv:
        weights = _weight_inputs(g, np.transpose(w, (3, 2, 0, 1)), signed_input)  # HWIO -> OIHW
        if first:
            x = _pad_first(g, x, entry["padding"], pad_value)
            pads = [0, 0, 0, 0]
        else:
            (pt, pb), (pl, pr) = entry["padding"]
            pads = [pt, pl, pb, pr]  # zero padding: no zero point, so pads hold 0
        kh, kw = entry["weight_shape"][:2]
        acc = g.op("ConvInteger", [x, *weights], kernel_shape=[kh, kw],
                   strides=[entry["stride"]] * 2, pads=pads)
    else:
        if layout == "NCHW":  # artifact flattens NHWC row-major
            x = g.op("Transpose", [x], perm=[0, 2, 3, 1])
        x = g.op("Flatten", [x], axis=1)
        acc = g.op("MatMulInteger", [x, *_weight_inputs(g, w, signed_input)])
    acc = g.op("Add", [acc, _per_channel(g, tensors[keys["bias"]], np.int32, conv, "bias")])
    pool = entry.get("pool")
    out = entry["output"]
    if out == "requant_out":
        if pool:
            acc = _pool_int32(g, acc, pool, _pre_pool_hw(entry))
        y = _requant(g, acc, tensors[keys["multiplier"]], tensors[keys["shift"]], conv)
        y = g.op("Clip", [y, g.const(-(2**31), np.int64), g.const(2**31 - 1, np.int64)])
        y = g.op("Cast", [y], to=tp.INT32)
    elif out == "sign":
        ge = g.op("GreaterOrEqual", [acc, g.const(0, np.int32, "zero")])
        y = g.op("Where", [ge, g.const(1, np.int8, "one"), g.const(-1, np.int8, "minus_one")])
    else:
        y = _requant(g, acc, tensors[keys["multiplier"]], tensors[keys["shift"]], conv)
        y = g.op("Clip", [y, g.const(0, np.int64), g.const(2 ** entry["a_bits"] - 1, np.int64)])
        y = g.op("Cast", [y], to=tp.UINT8)
    if pool and out != "requant_out":
        y = g.op("MaxPool", [y], kernel_shape=[pool, pool], strides=[pool, pool])
    return y, ("NCHW" if conv else "NC")


def _pre_pool_hw(entry: dict):
    """Conv output H, W before pooling, from the layer's input shape and geometry."""
    h, w = entry["in_shape"][:2]
    (pt, pb), (pl, pr) = entry["padding"]
    kh, kw = entry["weight_shape"][:2]
    s = entry["stride"]
    return (h + pt + pb - kh) // s + 1, (w + pl + pr - kw) // s + 1


def artifact_to_model(artifact_dir):
    """The integer ONNX ModelProto of an artifact (input 'images' uint8 NHWC, output
    'logits' int32 in the artifact's output layout)."""
    onnx = _onnx()
    manifest, tensors = read_artifact(artifact_dir)
    g = _Graph(onnx)
    h, w, c = manifest["input"]["shape"]
    pad_value = [int(v) for v in manifest["input"]["pad_value"]]
    x, layout = g.op("Transpose", ["images"], perm=[0, 3, 1, 2]), "NCHW"
    if manifest["layers"][0]["kind"] == "dense":
        x, layout = "images", "NHWC"
    signed = False  # uint8 images, then each layer's output codes
    for i, entry in enumerate(manifest["layers"]):
        x, layout = _layer(g, entry, tensors, x, layout, i == 0, pad_value, signed)
        signed = entry["output"] == "sign"
    if layout == "NCHW":
        x = g.op("Transpose", [x], perm=[0, 2, 3, 1])
    g.nodes.append(onnx.helper.make_node("Identity", [x], ["logits"]))
    out_shape = ["N", *manifest["layers"][-1]["out_shape"]]
    graph = onnx.helper.make_graph(
        g.nodes, "bnfree_int", [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.UINT8, ["N", h, w, c])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT32, out_shape)], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   ir_version=IR_VERSION, producer_name="bnfree_jax")
    onnx.checker.check_model(model)
    return model


def artifact_to_onnx(artifact_dir, out_path):
    """Write the integer ONNX graph of `artifact_dir` to `out_path`; return the ModelProto."""
    model = artifact_to_model(artifact_dir)
    with epath.Path(out_path).open("wb") as fh:
        _onnx().save(model, fh)
    return model
