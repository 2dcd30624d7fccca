"""Tampered and malformed artifacts: the manifest's self-hash, tensors no layer uses, a
manifest inconsistent with its tensors file, every field deleted / mistyped / absurd
(one ArtifactError line naming field and layer), and the raw-file audit."""

import copy
import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from int_reference import random_student  # noqa: E402

from bnfree_jax.export.artifact import write_artifact, write_manifest  # noqa: E402
from bnfree_jax.intsim import ArtifactError, audit_artifact, load_artifact, run_int  # noqa: E402

# two dense layers of the same shape: deleting one of them still chains
SPECS = [dict(kind="conv", cout=8, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2),
         dict(kind="dense", cout=12), dict(kind="dense", cout=12), dict(kind="dense", cout=10)]
PAD = [100, 7]
BIG = 2**40


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (8, 8, 8, 2), dtype=np.uint8)
    layers = random_student(rng, imgs, SPECS, [4, 4, 4, 8], [4, 4, 4, 32], PAD)
    d = str(tmp_path_factory.mktemp("base") / "art")
    write_artifact(d, layers=layers, input_spec={"shape": [8, 8, 2], "pad_value": PAD}, config={"lr": 0.5},
                   metrics={})
    return d, imgs


def _copy(base, tmp_path) -> str:
    d = str(tmp_path / "copy")
    shutil.copytree(base[0], d)
    return d


def _manifest(d) -> dict:
    return json.load(open(os.path.join(d, "manifest.json")))


def _refused(d, match: str) -> str:
    with pytest.raises(ArtifactError, match=match) as info:
        load_artifact(d)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _rewrite_tensors(d, fn):
    """Change the tensors file, then record its new sha256 in a resealed manifest."""
    path = os.path.join(d, "model.safetensors")
    tensors = {k: v.copy() for k, v in load_file(path).items()}
    fn(tensors)
    save_file(tensors, path)
    man = _manifest(d)
    man["tensors_sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    man["tensors"] = {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in tensors.items()}
    man["size"]["tensors_file_bytes"] = os.path.getsize(path)
    write_manifest(d, man)


# ---- defect 1: manifest covered by a hash; tensors file and manifest must agree ----

def test_deleting_a_layer_unsealed_is_refused_by_the_manifest_sha256(base, tmp_path):
    d = _copy(base, tmp_path)
    man = _manifest(d)
    del man["layers"][2]
    json.dump(man, open(os.path.join(d, "manifest.json"), "w"), indent=1)
    _refused(d, r"sha256 of manifest.json .* manifest_sha256 says [0-9a-f]{64} \(manifest altered\)")


def test_any_manifest_byte_changed_is_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    path = os.path.join(d, "manifest.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"lr": 0.5', '"lr": 0.6'))   # free-form config is covered too
    _refused(d, "manifest altered")


def test_deleting_a_layer_resealed_leaves_tensors_no_layer_uses(base, tmp_path):
    d = _copy(base, tmp_path)
    man = _manifest(d)
    del man["layers"][2]                      # dense2: [12, 12], so the graph still chains
    write_manifest(d, man)
    _refused(d, r"tensors \['2.b', '2.m', '2.s', '2.w'\] in model.safetensors are used by no layer")


def test_deleting_a_layer_and_its_tensor_entries_is_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    man = _manifest(d)
    del man["layers"][2]
    for k in ("2.w", "2.b", "2.m", "2.s"):
        del man["tensors"][k]
    write_manifest(d, man)
    _refused(d, r"only in the file \['2.b', '2.m', '2.s', '2.w'\], only in the manifest \[\]")


def test_extra_tensor_in_the_file_is_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    _rewrite_tensors(d, lambda t: t.update({"9.extra": np.zeros(4, np.int32)}))
    _refused(d, r"tensors \['9.extra'\] in model.safetensors are used by no layer")


def test_tensor_shared_by_two_layers_is_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    man = _manifest(d)
    man["layers"][3]["tensors"]["shift"] = "0.s"
    write_manifest(d, man)
    _refused(d, r"tensor 0.s: used twice \(layer conv0 shift and layer dense3 shift\)")


def test_manifest_without_a_self_hash_is_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    man = _manifest(d)
    del man["manifest_sha256"]                # as the writer before the self-hash wrote it
    json.dump(man, open(os.path.join(d, "manifest.json"), "w"), indent=1)
    _refused(d, "must contain '\"manifest_sha256\": \"' exactly once")


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["layers"][1].update(in_shape=[128]), r"dense1: manifest in_shape \[128\] != recomputed \[4, 4, 8\]"),
    (lambda m: m["layers"][3].update(k=12.0), r"dense3: manifest k 12.0 != recomputed 12"),
    (lambda m: m["layers"][1].update(max_abs_input=16), r"dense1: manifest max_abs_input 16 != recomputed 15"),
    (lambda m: m["layers"][0].update(headroom_bits=0), r"conv0: manifest headroom_bits 0 != recomputed"),
    (lambda m: m["size"].update(tensors_file_bytes=1), r"size: tensors_file_bytes 1 != the file's"),
    (lambda m: m["size"].update(ideal_bytes=1), r"size: ideal_bytes 1 != recomputed"),
    (lambda m: m["tensors"]["2.w"].update(shape=[73]), r"tensor 2.w: shape \[72\], manifest says \[73\]"),
    (lambda m: m["tensors"]["1.b"].update(dtype="int8"), r"tensor 1.b: dtype int32, manifest says 'int8'"),
])
def test_derived_fields_must_match_the_files(base, tmp_path, edit, match):
    d = _copy(base, tmp_path)
    man = _manifest(d)
    edit(man)
    write_manifest(d, man)
    _refused(d, match)


def test_nonzero_padding_bits_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (4, 6, 6, 1), dtype=np.uint8)
    specs = [dict(kind="conv", cout=7, k=3, padding=[[1, 1], [1, 1]], pool=2), dict(kind="dense", cout=10)]
    layers = random_student(rng, imgs, specs, [3, 8], [4, 32], [0])   # 63 codes * 3 bits: 3 spare bits
    d = str(tmp_path / "art")
    write_artifact(d, layers=layers, input_spec={"shape": [6, 6, 1], "pad_value": [0]}, config={}, metrics={})
    load_artifact(d)

    def set_spare_bit(t):
        t["0.w"][-1] |= 0x80
    _rewrite_tensors(d, set_spare_bit)
    _refused(d, "layer conv0: padding bits of the packed weight are not zero")


def test_resealed_artifact_still_runs(base, tmp_path):
    """Resealing an unchanged manifest is harmless: the checks above are not over-strict."""
    d = _copy(base, tmp_path)
    write_manifest(d, _manifest(d))
    assert np.asarray(run_int(load_artifact(d), base[1])).shape == (8, 10)


# ---- defect 2: every field deleted / mistyped / absurd gives one ArtifactError line ----

LAYER0, LAYER1 = "conv0", "dense1"
CONV_FIELDS = ["name", "kind", "w_bits", "weight_shape", "tensors", "output", "a_bits", "pool", "in_shape",
               "out_shape", "k", "max_abs_input", "acc_bound", "headroom_bits", "stride", "padding"]
ABSURD = {"w_bits": [0, 9, BIG], "a_bits": [0, 9, BIG], "pool": [0, -1, BIG], "stride": [0, -1, BIG],
          "weight_shape": [[BIG, BIG, 2, 8], [3, 3, 2, 0], [3, 3, 2]],
          "padding": [[[BIG, 0], [0, 0]], [[3, 3], [1, 1]], [[-1, 1], [1, 1]], [[1, 1]]],
          "in_shape": [[BIG, BIG, 2]], "out_shape": [[BIG, BIG]], "k": [BIG, -1], "acc_bound": [BIG],
          "max_abs_input": [-1], "headroom_bits": [BIG], "kind": ["batchnorm"], "output": ["gelu"],
          "name": [""], "tensors": [{}, {"weight": "0.w"}]}


def _layer_cases():
    cases = []
    for layer, name in ((0, LAYER0), (1, LAYER1)):
        fields = CONV_FIELDS if layer == 0 else CONV_FIELDS[:-2]      # dense: no stride / padding
        for f in fields:
            where = f"layer {layer}" if f == "name" else f"layer {name}"
            cases.append((f"{name}.{f}:delete", ("layers", layer), f, "DELETE", where))
            wrong = 7 if f in ("name", "kind", "output", "tensors") else "seven"
            cases.append((f"{name}.{f}:type", ("layers", layer), f, wrong, where))
            cases.append((f"{name}.{f}:float", ("layers", layer), f, 2.0, where))
            for i, v in enumerate(ABSURD.get(f, [])):
                cases.append((f"{name}.{f}:absurd{i}", ("layers", layer), f, v, where))
        for role in ("weight", "bias", "multiplier", "shift"):
            for how, value in (("delete", "DELETE"), ("type", 3), ("absent", "nope")):
                cases.append((f"{name}.tensors.{role}:{how}", ("layers", layer, "tensors"), role, value,
                              f"layer {name}"))
    cases.append(("dense1.stride:on_dense", ("layers", 1), "stride", 1, "layer dense1"))
    cases.append(("dense1.weight_shape:huge", ("layers", 1), "weight_shape", [BIG, BIG], "layer dense1"))
    cases.append(("dense1.bn_eps:unknown", ("layers", 1), "bn_eps", 1e-5, "layer dense1"))
    return cases


def _other_cases():
    cases = []
    for f in ("format", "format_version", "tensors_file", "tensors_sha256", "input", "packing", "layers",
              "tensors", "size", "config", "metrics"):
        cases.append((f"top.{f}:delete", (), f, "DELETE", ""))
        if f not in ("config", "metrics"):
            cases.append((f"top.{f}:type", (), f, 7 if f != "tensors_sha256" else "ab" * 31, ""))
    cases += [("top.layers:empty", (), "layers", [], ""), ("top.format_version:float", (), "format_version", 1.0, ""),
              ("top.extra:unknown", (), "bn_stats", [], ""),
              ("top.layers:item", (), "layers", [7, 8], "layer 0: must be a JSON object")]
    for f in ("shape", "dtype", "layout", "pad_value"):
        cases.append((f"input.{f}:delete", ("input",), f, "DELETE", "input"))
        cases.append((f"input.{f}:type", ("input",), f, 7, "input"))
    cases += [("input.shape:huge", ("input",), "shape", [BIG, BIG, 2], "input"),
              ("input.shape:too_many_elements", ("input",), "shape", [60000, 60000, 2], "input"),
              ("input.shape:float", ("input",), "shape", [8.0, 8, 2], "input"),
              ("input.pad_value:range", ("input",), "pad_value", [256, 0], "input")]
    for f in ("dtype", "shape"):
        cases.append((f"tensors.0.w.{f}:delete", ("tensors", "0.w"), f, "DELETE", "0.w"))
        cases.append((f"tensors.0.w.{f}:type", ("tensors", "0.w"), f, 7, "0.w"))
    cases.append(("tensors.0.w:type", ("tensors",), "0.w", 7, "0.w"))
    for f in ("tensors_file_bytes", "ideal_bytes", "ratio"):
        cases.append((f"size.{f}:delete", ("size",), f, "DELETE", "size"))
        cases.append((f"size.{f}:type", ("size",), f, "big", "size"))
    return cases


CASES = _layer_cases() + _other_cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_bad_field_is_one_clear_artifact_error(base, tmp_path, case):
    _, where, field, value, names = case
    d = _copy(base, tmp_path)
    man = _manifest(d)
    obj = man
    for key in where:
        obj = obj[key]
    if value == "DELETE":
        del obj[field]
    else:
        obj[field] = copy.deepcopy(value)
    write_manifest(d, man)
    with pytest.raises(ArtifactError) as info:
        load_artifact(d)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert names in msg, msg                                             # the layer / section
    assert re.search(rf"\b{re.escape(field)}\b", msg) or value == [7, 8], msg   # the field


def test_field_table_covers_every_manifest_field(base):
    """The table above mutates every field a written manifest has (none forgotten)."""
    man = json.load(open(os.path.join(base[0], "manifest.json")))
    layer_fields = {c[2] for c in CASES if c[1] == ("layers", 0)}
    top_fields = {c[2] for c in CASES if c[1] == ()}
    assert set(man["layers"][0]) <= layer_fields and set(man["layers"][1]) <= layer_fields
    assert set(man) - {"manifest_sha256"} <= top_fields
    assert set(man["input"]) <= {c[2] for c in CASES if c[1] == ("input",)}
    assert set(man["size"]) <= {c[2] for c in CASES if c[1] == ("size",)}


# ---- defect 4: the raw-file audit ----

def test_audit_of_a_sound_artifact_is_all_zero(base):
    report = audit_artifact(base[0])
    assert report["tensors"] == 16 and report["layers"] == 4
    assert {k: report[k] for k in ("float_tensors", "float_params", "non_integer_ops", "normalisation",
                                   "unused_tensors")} == dict.fromkeys(
        ("float_tensors", "float_params", "non_integer_ops", "normalisation", "unused_tensors"), 0)
    assert report["examples"] == {}


def _hand_written(d, tensors: dict, layers: list):
    """An artifact written by hand: any tensors, any layer entries, no writer checks."""
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "model.safetensors"))
    manifest = {"format": "bnfree-int-artifact", "format_version": 1, "tensors_file": "model.safetensors",
                "layers": layers, "tensors": {k: {"dtype": v.dtype.name, "shape": list(v.shape)}
                                              for k, v in tensors.items()}}
    json.dump(manifest, open(os.path.join(d, "manifest.json"), "w"))


def test_audit_finds_a_hand_written_batchnorm(base, tmp_path):
    src = load_file(os.path.join(base[0], "model.safetensors"))
    layers = _manifest(base[0])["layers"]
    tensors = dict(src)
    tensors["1.bn.running_var"] = np.ones(12, np.float32)        # a float BN statistic...
    tensors["1.bn.gamma"] = np.ones(12, np.float32)              # ...and a scale, used by the op below
    tensors["9.spare"] = np.zeros(3, np.int32)                   # used by nobody
    bn = {"name": "bn1", "kind": "batchnorm", "output": "affine", "eps": 1e-5,
          "tensors": {"scale": "1.bn.gamma", "var": "1.bn.running_var"}}
    d = str(tmp_path / "crafted")
    _hand_written(d, tensors, layers[:2] + [bn] + layers[2:])
    report = audit_artifact(d)
    assert report["float_tensors"] == 2 and report["float_params"] == 1
    assert report["non_integer_ops"] == 2                        # kind 'batchnorm', output 'affine'
    assert report["normalisation"] == 3                          # two tensors + the op
    assert report["unused_tensors"] == 1 and report["examples"]["unused_tensors"] == ["tensor 9.spare"]
    assert any("batchnorm" in e for e in report["examples"]["normalisation"])
    with pytest.raises(ArtifactError):
        load_artifact(d)


def test_audit_finds_a_bn_named_integer_tensor_and_op(base, tmp_path):
    """No float anywhere, only names: a BN folded into an int32 tensor still shows."""
    tensors = dict(load_file(os.path.join(base[0], "model.safetensors")))
    layers = copy.deepcopy(_manifest(base[0])["layers"])
    tensors["conv0_bn_scale"] = tensors.pop("0.m")
    layers[0]["tensors"]["multiplier"] = "conv0_bn_scale"
    layers[1]["name"] = "BatchNorm_1"
    d = str(tmp_path / "named")
    _hand_written(d, tensors, layers)
    report = audit_artifact(d)
    assert report["float_tensors"] == 0 and report["non_integer_ops"] == 0 and report["unused_tensors"] == 0
    assert report["normalisation"] == 3          # the tensor, the layer using it, the BatchNorm_1 layer


def test_audit_refuses_unreadable_files(tmp_path):
    with pytest.raises(ArtifactError, match="cannot read manifest.json"):
        audit_artifact(tmp_path)
    json.dump({"layers": []}, open(tmp_path / "manifest.json", "w"))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        audit_artifact(tmp_path)
