"""ONNX export of the integer artifact: onnxruntime's int32 logits equal the jnp
interpreter's (and the numpy int64 reference's) bit for bit, and the graph holds no
floating-point tensor or op."""

import os
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="optional ONNX export: the 'onnx' package is not installed")
ort = pytest.importorskip("onnxruntime", reason="ONNX export test needs 'onnxruntime' to run the graph")

sys.path.insert(0, os.path.dirname(__file__))
from int_reference import random_student, reference_run  # noqa: E402

from bnfree_jax.export.artifact import write_artifact  # noqa: E402
from bnfree_jax.export.onnx_export import artifact_to_onnx  # noqa: E402
from bnfree_jax.intsim import load_artifact, run_int  # noqa: E402

SPECS = [dict(kind="conv", cout=24, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2),
         dict(kind="conv", cout=40, k=3, stride=2, padding=[[0, 1], [0, 1]]),
         dict(kind="conv", cout=16, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2),
         dict(kind="dense", cout=32), dict(kind="dense", cout=10)]
PAD = [120, 3, 250]
N_IMAGES = 200
TP = onnx.TensorProto
INT_TYPES = {TP.UINT8, TP.INT8, TP.INT32, TP.INT64, TP.BOOL}
FLOAT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
             "QLinearMatMul", "BatchNormalization", "Relu", "Sigmoid", "Softmax", "Round"}


def _export(tmp_path, w_bits, a_bits, specs=SPECS, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (N_IMAGES, 12, 12, 3), dtype=np.uint8)
    layers = random_student(rng, imgs[:32], specs, list(w_bits), list(a_bits) + [32], PAD)
    d = str(tmp_path / "art")
    write_artifact(d, layers=layers, input_spec={"shape": [12, 12, 3], "pad_value": PAD},
                   config={}, metrics={})
    path = str(tmp_path / "model.onnx")
    model = artifact_to_onnx(d, path)
    return d, path, model, imgs


def _run_onnx(path, imgs):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"images": imgs})[0]


@pytest.mark.parametrize("w,a", [(1, 1), (4, 4), (8, 8), (1, 4), (4, 1), (8, 1), (1, 8)])
def test_onnx_matches_interpreter_bit_for_bit(tmp_path, w, a):
    n_hidden = len(SPECS) - 1
    d, path, _, imgs = _export(tmp_path, [8] + [w] * (n_hidden - 1) + [8], [a] * n_hidden, seed=10 * w + a)
    got = _run_onnx(path, imgs)
    want = np.asarray(run_int(load_artifact(d), imgs))
    assert got.dtype == np.int32 and got.shape == (N_IMAGES, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, reference_run(d, imgs))
    assert len(np.unique(got)) > 50  # logits spread: the check is not on a constant


def test_onnx_mixed_widths_and_pooled_conv_logits(tmp_path):
    """A conv last layer with a pool exercises the int32 pool path and NHWC output."""
    specs = SPECS[:2] + [dict(kind="conv", cout=6, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=3)]
    d, path, _, imgs = _export(tmp_path, [8, 1, 4], [1, 8], specs=specs, seed=5)
    got = _run_onnx(path, imgs)
    want = np.asarray(run_int(load_artifact(d), imgs))
    assert got.shape == want.shape == (N_IMAGES, 1, 1, 6)
    np.testing.assert_array_equal(got, want)


def test_per_channel_pad_value_is_exact(tmp_path):
    """Images of constant pixel z_c: a padded border must look exactly like the interior."""
    n_hidden = len(SPECS) - 1
    d, path, _, _ = _export(tmp_path, [8, 4, 4, 4, 8], [4] * n_hidden, seed=3)
    imgs = np.broadcast_to(np.asarray(PAD, np.uint8), (4, 12, 12, 3)).copy()
    imgs[1:] = np.random.default_rng(1).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_run_onnx(path, imgs), reference_run(d, imgs))


def test_graph_is_integer_only(tmp_path):
    _, _, model, _ = _export(tmp_path, [8, 1, 4, 1, 8], [1, 4, 8, 1], seed=9)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    for init in g.initializer:
        assert init.data_type in INT_TYPES, f"initializer {init.name} has dtype {init.data_type}"
    typed = list(g.value_info) + list(g.input) + list(g.output)
    produced = {o for node in g.node for o in node.output}
    assert produced <= {v.name for v in typed}, "shape inference left some tensor untyped"
    for v in typed:
        assert v.type.tensor_type.elem_type in INT_TYPES, f"tensor {v.name} is not an integer"
    ops = {node.op_type for node in g.node}
    assert not ops & FLOAT_OPS
    assert {"ConvInteger", "MatMulInteger"} <= ops
    for node in g.node:
        for attr in node.attribute:
            assert attr.type != onnx.AttributeProto.FLOAT, f"{node.op_type} has a float attribute"
            if node.op_type == "Cast":
                assert attr.i in INT_TYPES


def test_refuses_tampered_artifact(tmp_path):
    d, _, _, _ = _export(tmp_path, [8, 4, 4, 4, 8], [4] * 4, seed=2)
    with open(os.path.join(d, "model.safetensors"), "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        artifact_to_onnx(d, str(tmp_path / "bad.onnx"))
