"""Load and validate an integer artifact (docs/artifact-format.md, "What the loader checks").

Every failure is one `ArtifactError` line naming the field and the layer. Nothing here
trusts the writer: both sha256s (the tensors file's and the manifest's own), every field's
type and range, tensor dtypes, shapes and packed sizes, that every tensor is used by
exactly one layer, the derived fields and the int32 bound are re-checked from the files.
Sizes are computed with Python ints (numpy products wrap int64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re

import numpy as np
from etils import epath
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from bnfree_jax.intsim.unpack import decode_codes, narrow_range, stream_nbytes

FORMAT = "bnfree-int-artifact"
SUPPORTED_VERSIONS = (1,)
OUTPUT_OPS = ("requant_relu", "sign", "requant_out")
KINDS = ("conv", "dense")
INT32_MAX = 2**31 - 1
ROLES = ("weight", "bias", "multiplier", "shift")
TOP_FIELDS = ("format", "format_version", "manifest_sha256", "tensors_file", "tensors_sha256", "input",
              "packing", "layers", "tensors", "size", "config", "metrics")
LAYER_FIELDS = ("name", "kind", "w_bits", "weight_shape", "tensors", "output", "a_bits", "pool",
                "in_shape", "out_shape", "k", "max_abs_input", "acc_bound", "headroom_bits")
CONV_FIELDS = ("stride", "padding")
SEAL = b'"manifest_sha256": "'   # the manifest's own digest follows: 64 hex digits and a quote


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


def _show(v, limit: int = 60) -> str:
    """repr of a manifest value, cut short so that a message stays one readable line."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _same(value, want) -> bool:
    """JSON value equals a derived int / list of ints, with no float or bool standing in."""
    if isinstance(want, list):
        return isinstance(value, list) and len(value) == len(want) and all(map(_same, value, want))
    return _is_int(value) and value == want


def _fields(obj: dict, names, where: str) -> None:
    """Refuse a missing or an unknown field of a manifest object."""
    for key in names:
        _need(key in obj, f"{where}: missing field {key!r}")
    extra = sorted(set(obj) - set(names))
    _need(not extra, f"{where}: unknown field {extra[:1]}")


def _int_field(obj: dict, key: str, where: str, lo: int, hi: int = INT32_MAX) -> int:
    v = obj[key]
    _need(_is_int(v) and lo <= v <= hi, f"{where}: field {key!r} must be an int in [{lo}, {hi}], got {_show(v)}")
    return v


def _int_list(obj: dict, key: str, where: str, length: int, lo: int) -> list:
    """A list of `length` ints in [lo, 2^31 - 1] whose product also fits int32."""
    v = obj[key]
    _need(isinstance(v, list) and len(v) == length and all(_is_int(x) and lo <= x <= INT32_MAX for x in v),
          f"{where}: field {key!r} must be {length} ints in [{lo}, {INT32_MAX}], got {_show(v)}")
    _need(math.prod(v) <= INT32_MAX, f"{where}: field {key!r} {v} has {math.prod(v)} elements (max {INT32_MAX})")
    return v


def manifest_digest(blob: bytes) -> tuple[str, str]:
    """(digest recorded in manifest.json, sha256 of its bytes with those 64 hex digits
    replaced by '0'): the manifest's self-hash, computed on the exact bytes (no JSON
    canonicalisation, so any reader in any language gets the same value)."""
    _need(blob.count(SEAL) == 1, 'manifest.json must contain \'"manifest_sha256": "\' exactly once '
          f"(found {blob.count(SEAL)}; written by an older writer, or edited)")
    i = blob.index(SEAL) + len(SEAL)
    recorded = blob[i:i + 64]
    _need(re.fullmatch(rb"[0-9a-f]{64}", recorded) is not None and blob[i + 64:i + 65] == b'"',
          "manifest_sha256 must be 64 lowercase hex digits")
    return recorded.decode(), hashlib.sha256(blob[:i] + b"0" * 64 + blob[i + 64:]).hexdigest()


def _read_manifest(path: str) -> dict:
    """Parse manifest.json; check format, version, its self-hash and its top-level fields."""
    mpath = epath.Path(path, "manifest.json")
    _need(mpath.is_file(), f"no manifest.json in {path}")
    blob = mpath.read_bytes()
    try:
        manifest = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"manifest.json is not valid JSON: {err}") from None
    _need(isinstance(manifest, dict), "manifest.json must hold a JSON object")
    _need(manifest.get("format") == FORMAT, f"manifest format is {_show(manifest.get('format'))}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    _need(_is_int(version) and version in SUPPORTED_VERSIONS,
          f"unsupported format_version {_show(version)} (this loader reads {list(SUPPORTED_VERSIONS)})")
    recorded, actual = manifest_digest(blob)
    _need(recorded == actual, f"sha256 of manifest.json (own digest zeroed) is {actual}, its manifest_sha256 "
          f"says {recorded} (manifest altered)")
    _need(manifest.get("manifest_sha256") == recorded, "manifest_sha256 must be a top-level field")
    _fields(manifest, TOP_FIELDS, "manifest")
    _need(isinstance(manifest["layers"], list) and manifest["layers"],
          "manifest field 'layers' must be a non-empty list")
    packing = manifest["packing"]
    _need(isinstance(packing, dict) and packing.get("scheme") == "lsb-first-bitstream",
          "manifest field 'packing' must have scheme 'lsb-first-bitstream'")
    return manifest


def _tensor_meta(meta) -> None:
    """The manifest's 'tensors' section: {name: {"dtype": str, "shape": [ints >= 0]}}."""
    _need(isinstance(meta, dict), "manifest field 'tensors' must be a JSON object")
    for key, m in meta.items():
        where = f"manifest tensors[{key!r}]"
        _need(isinstance(m, dict), f"{where}: must be a JSON object")
        _fields(m, ("dtype", "shape"), where)
        _need(isinstance(m["dtype"], str), f"{where}: field 'dtype' must be a string, got {_show(m['dtype'])}")
        _need(isinstance(m["shape"], list) and all(_is_int(v) and v >= 0 for v in m["shape"]),
              f"{where}: field 'shape' must be a list of ints >= 0, got {_show(m['shape'])}")


def _read_tensors(path: str, manifest: dict) -> tuple[dict, int]:
    """(tensors, file size): sha256 checked before parsing; names/dtypes/shapes == manifest."""
    tname = manifest["tensors_file"]
    _need(isinstance(tname, str) and tname and os.path.basename(tname) == tname, f"bad tensors_file {_show(tname)}")
    tpath = epath.Path(path, tname)
    _need(tpath.is_file(), f"tensors file {tname} is missing")
    want = manifest["tensors_sha256"]
    _need(isinstance(want, str) and re.fullmatch("[0-9a-f]{64}", want) is not None,
          f"manifest field 'tensors_sha256' must be 64 lowercase hex digits, got {_show(want)}")
    blob = tpath.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    _need(digest == want, f"sha256 of {tname} is {digest}, manifest says {want} (file altered)")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as err:
        raise ArtifactError(f"{tname} is not a valid safetensors file: {str(err).splitlines()[0]}") from None
    meta = manifest["tensors"]
    _tensor_meta(meta)
    only_file, only_man = sorted(set(tensors) - set(meta)), sorted(set(meta) - set(tensors))
    _need(not only_file and not only_man,
          f"tensors in {tname} differ from the manifest's 'tensors': only in the file {_show(only_file)}, "
          f"only in the manifest {_show(only_man)}")
    for key, arr in tensors.items():
        _need(arr.dtype.name == meta[key]["dtype"],
              f"tensor {key}: dtype {arr.dtype.name}, manifest says {_show(meta[key]['dtype'])}")
        _need(list(arr.shape) == meta[key]["shape"],
              f"tensor {key}: shape {list(arr.shape)}, manifest says {_show(meta[key]['shape'])}")
        _need(arr.dtype.name in ("int8", "uint8", "int32"), f"tensor {key}: dtype {arr.dtype.name} not allowed")
    return tensors, len(blob)


def _input(manifest: dict) -> tuple[tuple, tuple]:
    spec = manifest["input"]
    _need(isinstance(spec, dict), "manifest field 'input' must be a JSON object")
    _fields(spec, ("shape", "dtype", "layout", "pad_value"), "input")
    shape = _int_list(spec, "shape", "input", 3, 1)
    for key, want in (("dtype", "uint8"), ("layout", "NHWC")):
        _need(spec[key] == want, f"input: field {key!r} must be {want!r}, got {_show(spec[key])}")
    pad = spec["pad_value"]
    _need(isinstance(pad, list) and len(pad) == shape[2] and all(_is_int(v) and 0 <= v <= 255 for v in pad),
          f"input pad_value must be {shape[2]} ints in 0..255, got {_show(pad)}")
    return tuple(shape), tuple(pad)


def _layer_out_shape(entry: dict, in_shape: tuple, wshape: tuple, name: str) -> tuple:
    if entry["kind"] == "conv":
        _need(len(in_shape) == 3, f"layer {name}: conv needs an HWC input, got {list(in_shape)}")
        _need(wshape[2] == in_shape[2], f"layer {name}: weight has {wshape[2]} input channels, input has {in_shape[2]}")
        (pt, pb), (pl, pr) = entry["padding"]
        s = entry["stride"]
        out = ((in_shape[0] + pt + pb - wshape[0]) // s + 1, (in_shape[1] + pl + pr - wshape[1]) // s + 1, wshape[3])
        if entry["pool"] is not None:
            out = (out[0] // entry["pool"], out[1] // entry["pool"], out[2])
    else:
        _need(wshape[0] == math.prod(in_shape),
              f"layer {name}: dense weight {list(wshape)} does not match flattened input {list(in_shape)}")
        _need(entry["pool"] is None, f"layer {name}: pool is only allowed on conv layers")
        out = (wshape[1],)
    _need(min(out) >= 1, f"layer {name}: empty output shape {list(out)}")
    _need(math.prod(out) <= INT32_MAX, f"layer {name}: output shape {list(out)} too large")
    return out


def _check_entry(entry, index: int, n: int) -> str:
    """Types and ranges of one layer's own fields; returns its name."""
    _need(isinstance(entry, dict), f"layer {index}: must be a JSON object")
    name = entry.get("name")
    _need(isinstance(name, str) and name != "",
          f"layer {index}: field 'name' must be a non-empty string, got {_show(name)}")
    where = f"layer {name}"
    _need("kind" in entry, f"{where}: missing field 'kind'")
    _need(entry["kind"] in KINDS, f"{where}: unknown op kind {_show(entry.get('kind'))} (known: {list(KINDS)})")
    conv = entry["kind"] == "conv"
    _fields(entry, LAYER_FIELDS + (CONV_FIELDS if conv else ()), where)
    _need(entry["output"] in OUTPUT_OPS,
          f"{where}: unknown output op {_show(entry['output'])} (known: {list(OUTPUT_OPS)})")
    bits = entry["w_bits"]
    _need(_is_int(bits) and 1 <= bits <= 8, f"{where}: w_bits must be in 1..8, got {_show(bits)}")
    a_bits = entry["a_bits"]
    want = {"sign": 1, "requant_out": 32}.get(entry["output"])
    _need(_is_int(a_bits) and (a_bits == want if want else 1 <= a_bits <= 8),
          f"{where}: a_bits {_show(a_bits)} invalid for output {entry['output']} (1..8 for requant_relu)")
    _need((entry["output"] == "requant_out") == (index == n - 1),
          f"{where}: requant_out must be the output of the last layer, and only of it")
    _need(entry["pool"] is None or (_is_int(entry["pool"]) and 1 <= entry["pool"] <= INT32_MAX),
          f"{where}: field 'pool' must be null or an int in [1, {INT32_MAX}], got {_show(entry['pool'])}")
    wshape = _int_list(entry, "weight_shape", where, 4 if conv else 2, 1)
    if conv:
        _int_field(entry, "stride", where, 1)
        pad = entry["padding"]
        _need(isinstance(pad, list) and len(pad) == 2 and all(isinstance(r, list) and len(r) == 2 and
              all(_is_int(v) and 0 <= v < k for v in r) for r, k in zip(pad, wshape)),
              f"{where}: field 'padding' must be [[t, b], [l, r]] ints >= 0 and below the kernel size, "
              f"got {_show(pad)}")
    keys = entry["tensors"]
    _need(isinstance(keys, dict), f"{where}: field 'tensors' must be a JSON object")
    _fields(keys, ROLES, f"{where} tensors")
    for role in ROLES:
        _need(isinstance(keys[role], str), f"{where}: tensors.{role} must be a tensor name, got {_show(keys[role])}")
    return name


def _check_tensor_use(entries: list, names: list, tensors: dict, tname: str) -> None:
    """Every tensor of the file belongs to exactly one (layer, role): nothing extra, nothing shared."""
    owner = {}
    for entry, name in zip(entries, names):
        for role, key in entry["tensors"].items():
            _need(key in tensors, f"layer {name}: {role} tensor {key!r} not in the tensors file")
            _need(key not in owner, f"tensor {key}: used twice ({owner.get(key)} and layer {name} {role})")
            owner[key] = f"layer {name} {role}"
    unused = sorted(set(tensors) - set(owner))
    _need(not unused, f"tensors {_show(unused)} in {tname} are used by no layer (a layer removed from the manifest?)")


def _layer_tensors(entry: dict, tensors: dict, name: str):
    keys, bits, wshape = entry["tensors"], entry["w_bits"], tuple(entry["weight_shape"])
    raw = tensors[keys["weight"]]
    count = math.prod(wshape)
    if bits == 8:
        _need(raw.dtype == np.int8 and raw.shape == wshape,
              f"layer {name}: 8-bit weight must be int8 {list(wshape)}, got {raw.dtype.name} {list(raw.shape)}")
    else:
        nbytes = stream_nbytes(count, bits)
        _need(raw.dtype == np.uint8 and raw.shape == (nbytes,),
              f"layer {name}: {bits}-bit weight must be uint8 [{nbytes}], got {raw.dtype.name} {list(raw.shape)}")
        tail = count * bits % 8
        _need(tail == 0 or int(raw[-1]) >> tail == 0, f"layer {name}: padding bits of the packed weight are not zero")
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


def _check_derived(entry: dict, name: str, derived: dict) -> None:
    """The manifest's informative fields must equal what the loader recomputes."""
    for key, want in derived.items():
        _need(_same(entry[key], want), f"layer {name}: manifest {key} {_show(entry[key])} != recomputed {want}")


def _check_size(manifest: dict, nbytes: int, layers: list) -> None:
    """'size' must describe the tensors file: its byte count and the ideal packed size."""
    size = manifest["size"]
    _need(isinstance(size, dict), "manifest field 'size' must be a JSON object")
    _fields(size, ("tensors_file_bytes", "ideal_bytes", "ratio"), "size")
    bits = sum(math.prod(lay.weight_shape) * lay.w_bits + 32 * (lay.weight_shape[-1] + len(m) + len(s))
               for lay, m, s in layers)
    ideal = (bits + 7) // 8
    _need(_same(size["tensors_file_bytes"], nbytes),
          f"size: tensors_file_bytes {_show(size['tensors_file_bytes'])} != the file's {nbytes}")
    _need(_same(size["ideal_bytes"], ideal), f"size: ideal_bytes {_show(size['ideal_bytes'])} != recomputed {ideal}")
    ratio = size["ratio"]
    _need(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and
          math.isclose(ratio, nbytes / max(bits / 8, 1.0), rel_tol=1e-9),
          f"size: ratio {_show(ratio)} != recomputed {nbytes / max(bits / 8, 1.0)}")


def load_artifact(path) -> Artifact:
    """Read `manifest.json` + tensors from directory `path`, validate everything, decode codes."""
    path = os.fspath(path)
    manifest = _read_manifest(path)
    tensors, nbytes = _read_tensors(path, manifest)
    input_shape, pad_value = _input(manifest)
    entries = manifest["layers"]
    names = [_check_entry(entry, i, len(entries)) for i, entry in enumerate(entries)]
    dup = sorted({n for n in names if names.count(n) > 1})
    _need(not dup, f"layer names {dup} are used by more than one layer")
    _check_tensor_use(entries, names, tensors, manifest["tensors_file"])
    layers, weights, biases, mults, shifts = [], [], [], [], []
    cur, in_max, prev_sign = input_shape, 255, False
    for entry, name in zip(entries, names):
        codes, bias, mult, shift = _layer_tensors(entry, tensors, name)
        out_shape = _layer_out_shape(entry, cur, codes.shape, name)
        k = math.prod(codes.shape[:-1])
        bound = k * int(np.abs(codes.astype(np.int64)).max()) * in_max + int(np.abs(bias.astype(np.int64)).max())
        _need(bound <= INT32_MAX, f"layer {name}: worst-case accumulator {bound} overflows int32")
        _check_derived(entry, name, {"in_shape": list(cur), "out_shape": list(out_shape), "k": k,
                                     "max_abs_input": in_max, "acc_bound": bound,
                                     "headroom_bits": 31 - bound.bit_length()})
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
    _check_size(manifest, nbytes, list(zip(layers, mults, shifts)))
    return Artifact(path=path, manifest=manifest, input_shape=input_shape, pad_value=pad_value,
                    layers=tuple(layers), weights=tuple(weights), biases=tuple(biases),
                    multipliers=tuple(mults), shifts=tuple(shifts))
