"""Artifact writer and loader: packing, manifest, refusals, tamper detection."""

import hashlib
import json
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from int_reference import random_student, unpack_reference  # noqa: E402

from bnfree_jax.export.artifact import write_artifact, write_manifest  # noqa: E402
from bnfree_jax.export.packing import pack_codes  # noqa: E402
from bnfree_jax.intsim import ArtifactError, load_artifact, overflow_bounds  # noqa: E402
from bnfree_jax.intsim.unpack import decode_codes  # noqa: E402

SPECS = [dict(kind="conv", cout=8, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2),
         dict(kind="dense", cout=12), dict(kind="dense", cout=10)]
PAD = [100, 7]


def _small(tmp_path, w_bits=(4, 4, 8), a_bits=(4, 4, 32), seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (4, 8, 8, 2), dtype=np.uint8)
    layers = random_student(rng, imgs, SPECS, list(w_bits), list(a_bits), PAD)
    d = str(tmp_path / "art")
    man = write_artifact(d, layers=layers, input_spec={"shape": [8, 8, 2], "pad_value": PAD},
                         config={"model": "tiny", "lr": np.float32(0.5)}, metrics={"top1": 0.9})
    return d, man, layers


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_every_width(bits):
    rng = np.random.default_rng(bits)
    lo, hi = (-1, 1) if bits == 1 else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    codes = rng.choice(np.array([-1, 1]), (3, 5, 7)) if bits == 1 else rng.integers(lo, hi + 1, (3, 5, 7))
    codes.flat[:2] = [lo, hi]
    packed = pack_codes(codes, bits)
    if bits == 8:
        assert packed.dtype == np.int8 and packed.shape == codes.shape
    else:
        assert packed.dtype == np.uint8 and packed.shape == ((105 * bits + 7) // 8,)
    np.testing.assert_array_equal(decode_codes(packed, bits, codes.shape), codes)
    np.testing.assert_array_equal(unpack_reference(packed, bits, codes.shape), codes)


@pytest.mark.parametrize("bits,codes,expected", [
    (1, [1, -1, -1, 1, 1, 1, -1, -1, 1], [0b00111001, 0b1]),
    (2, [1, -1, 0, 1], [1 | 3 << 2 | 0 << 4 | 1 << 6]),
    (3, [3, -3, 1], [0b01101011, 0]),   # fields 011, 101, 001
    (4, [1, -1, 7, -7], [0xF1, 0x97]),
])
def test_pack_bit_order_is_lsb_first(bits, codes, expected):
    assert pack_codes(np.array(codes), bits).tolist() == expected


@pytest.mark.parametrize("bits,bad", [(4, -8), (2, 2), (1, 0), (8, -128)])
def test_pack_refuses_out_of_range(bits, bad):
    with pytest.raises(ValueError, match="weight codes"):
        pack_codes(np.array([0 if bits > 1 else 1, bad]), bits)


def test_manifest_and_tensors_are_integer_only(tmp_path):
    d, man, layers = _small(tmp_path)
    assert set(os.listdir(d)) == {"manifest.json", "model.safetensors"}
    on_disk = json.load(open(os.path.join(d, "manifest.json")))
    assert on_disk == man and man["format_version"] == 1 and man["config"]["lr"] == 0.5
    blob = open(os.path.join(d, "model.safetensors"), "rb").read()
    assert man["tensors_sha256"] == hashlib.sha256(blob).hexdigest()
    text = open(os.path.join(d, "manifest.json"), "rb").read()   # the spec's recipe, by hand
    zeroed = text.replace(man["manifest_sha256"].encode(), b"0" * 64)
    assert len(zeroed) == len(text) and hashlib.sha256(zeroed).hexdigest() == man["manifest_sha256"]
    tensors = load_file(os.path.join(d, "model.safetensors"))
    assert {t.dtype.name for t in tensors.values()} <= {"int8", "uint8", "int32"}
    ops = {(e["kind"], e["output"]) for e in man["layers"]}
    assert ops == {("conv", "requant_relu"), ("dense", "requant_relu"), ("dense", "requant_out")}
    assert "bn" not in json.dumps(man["layers"]).lower().replace("bnfree", "")
    for entry, layer in zip(man["layers"], layers):
        w = unpack_reference(tensors[entry["tensors"]["weight"]], entry["w_bits"], entry["weight_shape"])
        np.testing.assert_array_equal(w, layer["weight"])
        k = int(np.prod(layer["weight"].shape[:-1]))
        bound = k * int(np.abs(layer["weight"]).max()) * entry["max_abs_input"] + int(np.abs(layer["bias"]).max())
        assert entry["acc_bound"] == bound and entry["headroom_bits"] == 31 - bound.bit_length()
    assert [e["max_abs_input"] for e in man["layers"]] == [255, 15, 15]
    assert [e["out_shape"] for e in man["layers"]] == [[4, 4, 8], [12], [10]]
    rows = overflow_bounds(load_artifact(d))
    assert [r["bound"] for r in rows] == [e["acc_bound"] for e in man["layers"]]


@pytest.mark.parametrize("mid", [4, 1])
def test_size_within_5_percent_of_ideal_on_mnist_graph(tmp_path, mid):
    p1 = [[1, 1], [1, 1]]
    specs = [dict(kind="conv", cout=32, k=5, padding=[[2, 2], [2, 2]], pool=2),
             dict(kind="conv", cout=64, k=3, padding=p1, pool=2), dict(kind="conv", cout=96, k=3, padding=p1),
             dict(kind="conv", cout=96, k=3, padding=p1), dict(kind="conv", cout=64, k=3, padding=p1, pool=2),
             dict(kind="dense", cout=256), dict(kind="dense", cout=256), dict(kind="dense", cout=10)]
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    layers = random_student(rng, imgs, specs, [8] + [mid] * 6 + [8], [mid] * 7 + [32], [0])
    man = write_artifact(str(tmp_path), layers=layers, input_spec={"shape": [28, 28, 1], "pad_value": [0]},
                         config={}, metrics={})
    n_w = sum(layer["weight"].size * layer["w_bits"] for layer in layers) / 8
    n_i32 = sum(layer["bias"].size + layer["multiplier"].size + layer["shift"].size for layer in layers) * 4
    assert man["size"]["ideal_bytes"] == int(np.ceil(n_w + n_i32))
    assert man["size"]["tensors_file_bytes"] == os.path.getsize(tmp_path / "model.safetensors")
    assert man["size"]["tensors_file_bytes"] <= 1.05 * man["size"]["ideal_bytes"]


def test_writer_refuses_overflowing_layer(tmp_path):
    w = np.full((70000, 10), 127, np.int8)
    layer = {"name": "huge_fc", "kind": "dense", "weight": w, "w_bits": 8, "bias": np.zeros(10, np.int32),
             "output": "requant_out", "multiplier": np.ones(1, np.int32), "shift": np.zeros(1, np.int32)}
    with pytest.raises(ValueError, match=r"huge_fc.*2266950000"):
        write_artifact(str(tmp_path), layers=[layer], input_spec={"shape": [100, 700, 1], "pad_value": [0]},
                       config={}, metrics={})


@pytest.mark.parametrize("field,value,match", [
    ("weight", np.full((3, 3, 2, 8), -8, np.int8), "weight codes must lie in"),
    ("bias", np.zeros(7, np.int32), "bias must have shape"),
    ("shift", np.full(1, 63, np.int32), "shifts must lie in"),
    ("multiplier", np.zeros(1, np.int32), "multipliers must be > 0"),
    ("output", "requant_out", "requant_out"),
    ("output", "batchnorm", "output must be one of"),
    ("w_bits", 9, "bits must be an int in 1..8"),
])
def test_writer_refuses_bad_layers(tmp_path, field, value, match):
    _, _, layers = _small(tmp_path)
    layers[0][field] = value
    with pytest.raises(ValueError, match=match):
        write_artifact(str(tmp_path / "bad"), layers=layers, input_spec={"shape": [8, 8, 2], "pad_value": PAD},
                       config={}, metrics={})


def test_tampered_tensor_byte_is_detected(tmp_path):
    d, _, _ = _small(tmp_path)
    load_artifact(d)
    path = os.path.join(d, "model.safetensors")
    blob = bytearray(open(path, "rb").read())
    blob[-3] ^= 0x01
    open(path, "wb").write(bytes(blob))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(d)


def _edit_manifest(d, fn):
    """Edit manifest.json and reseal it (a consistent self-hash), so that the check under
    test is the one that fires, not the manifest's sha256."""
    man = json.load(open(os.path.join(d, "manifest.json")))
    fn(man)
    write_manifest(d, man)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["layers"][1].update(kind="batchnorm"), "unknown op kind 'batchnorm'"),
    (lambda m: m["layers"][0].update(output="gelu"), "unknown output op 'gelu'"),
    (lambda m: m["layers"][0].update(w_bits=9), "w_bits must be in 1..8, got 9"),
    (lambda m: m["layers"][0].update(weight_shape=[3, 3, 2, 9]), "4-bit weight must be uint8"),
    (lambda m: m["tensors"]["1.b"].update(shape=[13]), "tensor 1.b: shape"),
    (lambda m: m["layers"][1].update(weight_shape=[100, 12]), r"4-bit weight must be uint8 \[600\]"),
    (lambda m: m["layers"][0].update(padding=[[0, 0], [0, 0]]),
     r"conv0: manifest out_shape \[4, 4, 8\] != recomputed \[3, 3, 8\]"),
    (lambda m: [m["layers"][0].update(padding=[[0, 0], [0, 0]]), m["layers"][0].update(out_shape=[3, 3, 8])],
     r"dense weight \[128, 12\] does not match"),
    (lambda m: m.update(format_version=2), "unsupported format_version 2"),
    (lambda m: m["input"].update(pad_value=[1]), "pad_value"),
    (lambda m: m["layers"][0].update(acc_bound=5), "acc_bound 5 != recomputed"),
])
def test_loader_refuses_bad_manifest(tmp_path, edit, match):
    d, _, _ = _small(tmp_path)
    _edit_manifest(d, edit)
    with pytest.raises(ArtifactError, match=match) as info:
        load_artifact(d)
    assert "\n" not in str(info.value)


def test_loader_refuses_out_of_range_codes_with_valid_hash(tmp_path):
    d, _, _ = _small(tmp_path)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    tensors["0.w"] = tensors["0.w"].copy()
    tensors["0.w"][0] = 0x88                  # two 4-bit fields of -8: outside the narrow range
    save_file(tensors, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    _edit_manifest(d, lambda m: m.update(tensors_sha256=digest))
    with pytest.raises(ArtifactError, match=r"layer conv0: 4-bit weight codes span \[-8"):
        load_artifact(d)
