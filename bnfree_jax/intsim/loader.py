"""Load and validate an integer artifact (docs/artifact-format.md).

Every failure is one `ArtifactError` line naming what is wrong. Nothing here trusts
the writer: codes, shapes, dtypes, op kinds, bits, the sha256 and the int32 bound
are all re-checked from the files themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from bnfree_jax.intsim.unpack import decode_codes, narrow_range, stream_nbytes

FORMAT = "bnfree-int-artifact"
SUPPORTED_VERSIONS = (1,)
OUTPUT_OPS = ("requant_relu", "sign", "requant_out")
KINDS = ("conv", "dense")
INT32_MAX = 2**31 - 1


class ArtifactError(ValueError):
    """An artifact that this interpreter refuses to run."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One validated layer: static fields (hashable) for the interpreter's plan."""
    name: str
    kind: str
    w_bits: int
    output: str
    a_bits: int
    pool: int | None
    stride: int
    padding: tuple
    in_shape: tuple
    weight_shape: tuple
    binary: bool      # 1-bit weights and +-1 input from a sign layer: XOR/popcount path
    in_max: int       # largest input code magnitude (255 for pixels)


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
    """A loaded artifact: manifest, static layer plan and decoded integer tensors."""
    path: str
    manifest: dict
    input_shape: tuple
    pad_value: tuple
    layers: tuple
    weights: tuple      # int8 codes, logical HWIO / [in, out]
    biases: tuple       # int32 [out]
    multipliers: tuple  # int32 [1] or [out]
    shifts: tuple       # int32 [1] or [out]
    cache: dict = dataclasses.field(default_factory=dict, repr=False)  # interpreter's device params


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ArtifactError(msg)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    _need(os.path.isfile(mpath), f"no manifest.json in {path}")
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"manifest.json is not valid JSON: {err}") from None
    _need(isinstance(manifest, dict), "manifest.json must hold a JSON object")
    _need(manifest.get("format") == FORMAT, f"manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    _need(version in SUPPORTED_VERSIONS,
          f"unsupported format_version {version!r} (this loader reads {list(SUPPORTED_VERSIONS)})")
    for key in ("tensors_file", "tensors_sha256", "input", "layers", "tensors"):
        _need(key in manifest, f"manifest is missing the field {key!r}")
    _need(isinstance(manifest["layers"], list) and manifest["layers"], "manifest 'layers' must be a non-empty list")
    return manifest


def _read_tensors(path: str, manifest: dict) -> dict:
    tname = manifest["tensors_file"]
    _need(isinstance(tname, str) and os.path.basename(tname) == tname, f"bad tensors_file {tname!r}")
    tpath = os.path.join(path, tname)
    _need(os.path.isfile(tpath), f"tensors file {tname} is missing")
    with open(tpath, "rb") as fh:
        blob = fh.read()
    digest = hashlib.sha256(blob).hexdigest()
    _need(digest == manifest["tensors_sha256"],
          f"sha256 of {tname} is {digest}, manifest says {manifest['tensors_sha256']} (file altered)")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as err:
        raise ArtifactError(f"{tname} is not a valid safetensors file: {err}") from None
    meta = manifest["tensors"]
    _need(set(tensors) == set(meta), f"tensors in {tname} {sorted(tensors)} differ from the manifest's {sorted(meta)}")
    for key, arr in tensors.items():
        _need(arr.dtype.name == meta[key].get("dtype"),
              f"tensor {key}: dtype {arr.dtype.name}, manifest says {meta[key].get('dtype')}")
        _need(list(arr.shape) == meta[key].get("shape"),
              f"tensor {key}: shape {list(arr.shape)}, manifest says {meta[key].get('shape')}")
        _need(arr.dtype.name in ("int8", "uint8", "int32"), f"tensor {key}: dtype {arr.dtype.name} not allowed")
    return tensors


def _input(manifest: dict) -> tuple[tuple, tuple]:
    spec = manifest["input"]
    shape = spec.get("shape") if isinstance(spec, dict) else None
    _need(isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape),
          f"input shape must be [H, W, C] positive ints, got {shape!r}")
    _need(spec.get("dtype") == "uint8" and spec.get("layout") == "NHWC", "input must be uint8 NHWC")
    pad = spec.get("pad_value")
    _need(isinstance(pad, list) and len(pad) == shape[2] and all(_is_int(v) and 0 <= v <= 255 for v in pad),
          f"input pad_value must be {shape[2]} ints in 0..255, got {pad!r}")
    return tuple(shape), tuple(pad)


def _layer_out_shape(entry: dict, in_shape: tuple, wshape: tuple, name: str) -> tuple:
    if entry["kind"] == "conv":
        _need(len(in_shape) == 3 and len(wshape) == 4, f"layer {name}: conv needs HWC input and HWIO weight")
        _need(wshape[2] == in_shape[2], f"layer {name}: weight has {wshape[2]} input channels, input has {in_shape[2]}")
        (pt, pb), (pl, pr) = entry["padding"]
        s = entry["stride"]
        out = ((in_shape[0] + pt + pb - wshape[0]) // s + 1, (in_shape[1] + pl + pr - wshape[1]) // s + 1, wshape[3])
        if entry["pool"] is not None:
            out = (out[0] // entry["pool"], out[1] // entry["pool"], out[2])
    else:
        _need(len(wshape) == 2 and wshape[0] == int(np.prod(in_shape)),
              f"layer {name}: dense weight {list(wshape)} does not match flattened input {list(in_shape)}")
        _need(entry["pool"] is None, f"layer {name}: pool is only allowed on conv layers")
        out = (wshape[1],)
    _need(min(out) >= 1, f"layer {name}: empty output shape {list(out)}")
    return out


def _check_entry(entry, index: int, n: int) -> str:
    _need(isinstance(entry, dict), f"layer {index}: must be a JSON object")
    name = str(entry.get("name", index))
    _need(entry.get("kind") in KINDS, f"layer {name}: unknown op kind {entry.get('kind')!r} (known: {list(KINDS)})")
    _need(entry.get("output") in OUTPUT_OPS,
          f"layer {name}: unknown output op {entry.get('output')!r} (known: {list(OUTPUT_OPS)})")
    bits = entry.get("w_bits")
    _need(_is_int(bits) and 1 <= bits <= 8, f"layer {name}: w_bits must be in 1..8, got {bits!r}")
    a_bits = entry.get("a_bits")
    want = {"sign": 1, "requant_out": 32}.get(entry["output"])
    _need(_is_int(a_bits) and (a_bits == want if want else 1 <= a_bits <= 8),
          f"layer {name}: a_bits {a_bits!r} invalid for output {entry['output']} (1..8 for requant_relu)")
    _need((entry["output"] == "requant_out") == (index == n - 1),
          f"layer {name}: requant_out must be the output of the last layer, and only of it")
    pool = entry.get("pool")
    _need(pool is None or (_is_int(pool) and pool >= 1), f"layer {name}: pool must be null or an int >= 1")
    if entry["kind"] == "conv":
        pad = entry.get("padding")
        _need(isinstance(pad, list) and len(pad) == 2 and all(isinstance(r, list) and len(r) == 2 and
              all(_is_int(v) and v >= 0 for v in r) for r in pad), f"layer {name}: padding must be [[t,b],[l,r]] >= 0")
        _need(_is_int(entry.get("stride")) and entry["stride"] >= 1, f"layer {name}: stride must be an int >= 1")
    keys = entry.get("tensors")
    _need(isinstance(keys, dict) and all(k in keys for k in ("weight", "bias", "multiplier", "shift")),
          f"layer {name}: 'tensors' must name weight, bias, multiplier and shift")
    ws = entry.get("weight_shape")
    _need(isinstance(ws, list) and all(_is_int(v) and v > 0 for v in ws), f"layer {name}: bad weight_shape {ws!r}")
    return name


def _layer_tensors(entry: dict, tensors: dict, name: str):
    keys, bits, wshape = entry["tensors"], entry["w_bits"], tuple(entry["weight_shape"])
    for k in keys.values():
        _need(k in tensors, f"layer {name}: tensor {k!r} not in the tensors file")
    raw = tensors[keys["weight"]]
    count = int(np.prod(wshape))
    if bits == 8:
        _need(raw.dtype == np.int8 and raw.shape == wshape,
              f"layer {name}: 8-bit weight must be int8 {list(wshape)}, got {raw.dtype.name} {list(raw.shape)}")
    else:
        nbytes = stream_nbytes(count, bits)
        _need(raw.dtype == np.uint8 and raw.shape == (nbytes,),
              f"layer {name}: {bits}-bit weight must be uint8 [{nbytes}], got {raw.dtype.name} {list(raw.shape)}")
    codes = decode_codes(raw, bits, wshape)
    lo, hi = narrow_range(bits)
    _need(int(codes.min()) >= lo and int(codes.max()) <= hi,
          f"layer {name}: {bits}-bit weight codes span [{int(codes.min())}, {int(codes.max())}], allowed [{lo}, {hi}]")
    cout = wshape[-1]
    bias, mult, shift = (tensors[keys[k]] for k in ("bias", "multiplier", "shift"))
    _need(bias.dtype == np.int32 and bias.shape == (cout,), f"layer {name}: bias must be int32 [{cout}]")
    for arr, what in ((mult, "multiplier"), (shift, "shift")):
        _need(arr.dtype == np.int32 and arr.ndim == 1 and arr.shape[0] in (1, cout),
              f"layer {name}: {what} must be int32 [1] or [{cout}], got {arr.dtype.name} {list(arr.shape)}")
    _need(int(mult.min()) > 0, f"layer {name}: multipliers must be > 0")
    _need(int(shift.min()) >= 0 and int(shift.max()) <= 62, f"layer {name}: shifts must lie in [0, 62]")
    return codes, bias, mult, shift


def load_artifact(path) -> Artifact:
    """Read `manifest.json` + tensors from directory `path`, validate everything, decode codes."""
    path = os.fspath(path)
    manifest = _read_manifest(path)
    tensors = _read_tensors(path, manifest)
    input_shape, pad_value = _input(manifest)
    entries = manifest["layers"]
    layers, weights, biases, mults, shifts = [], [], [], [], []
    cur, in_max, prev_sign = input_shape, 255, False
    for i, entry in enumerate(entries):
        name = _check_entry(entry, i, len(entries))
        codes, bias, mult, shift = _layer_tensors(entry, tensors, name)
        out_shape = _layer_out_shape(entry, cur, codes.shape, name)
        k = int(np.prod(codes.shape[:-1]))
        bound = k * int(np.abs(codes.astype(np.int64)).max()) * in_max + int(np.abs(bias.astype(np.int64)).max())
        _need(bound <= INT32_MAX, f"layer {name}: worst-case accumulator {bound} overflows int32")
        if "acc_bound" in entry:
            _need(entry["acc_bound"] == bound, f"layer {name}: manifest acc_bound {entry['acc_bound']} != recomputed {bound}")
        layers.append(Layer(
            name=name, kind=entry["kind"], w_bits=entry["w_bits"], output=entry["output"],
            a_bits=entry["a_bits"], pool=entry["pool"], stride=entry.get("stride", 1),
            padding=tuple(tuple(r) for r in entry.get("padding", [[0, 0], [0, 0]])),
            in_shape=tuple(cur), weight_shape=tuple(codes.shape),
            binary=entry["w_bits"] == 1 and prev_sign, in_max=in_max))
        weights.append(codes), biases.append(bias), mults.append(mult), shifts.append(shift)
        cur = out_shape
        in_max = 2 ** entry["a_bits"] - 1 if entry["output"] == "requant_relu" else 1
        prev_sign = entry["output"] == "sign"
    return Artifact(path=path, manifest=manifest, input_shape=input_shape, pad_value=pad_value,
                    layers=tuple(layers), weights=tuple(weights), biases=tuple(biases),
                    multipliers=tuple(mults), shifts=tuple(shifts))
