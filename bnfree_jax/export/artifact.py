"""Integer artifact writer: `model.safetensors` (packed codes, int32 biases and
requantisation constants) plus `manifest.json` (graph, shapes, bits, bounds, the tensors
file's sha256 and the manifest's own sha256, `manifest_sha256`).

The format is specified in docs/artifact-format.md. The writer refuses anything the
interpreter could not run exactly: out-of-range codes, bad shapes, and any layer whose
static accumulator bound K*max|w|*max|x| + max|bias| could overflow int32.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from etils import epath
from safetensors.numpy import save as safetensors_bytes

from bnfree_jax.export.packing import check_codes, pack_codes

FORMAT = "bnfree-int-artifact"
FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
INT32_MAX = 2**31 - 1
SEAL_FIELD = "manifest_sha256"
OUTPUT_OPS = ("requant_relu", "sign", "requant_out")


def _int_array(value, dtype, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: must be integers, got dtype {arr.dtype}")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"{what}: values out of {np.dtype(dtype).name} range")
    return arr.astype(dtype)


def _out_shape(layer: dict, in_shape: list[int], name: str) -> list[int]:
    """Shape after op (+pool) and the contraction length K; validates the weight shape."""
    w = np.asarray(layer["weight"])
    if layer["kind"] == "conv":
        if len(in_shape) != 3 or w.ndim != 4:
            raise ValueError(f"layer {name}: conv needs an HWC input and an HWIO weight, "
                             f"got input {in_shape} and weight {list(w.shape)}")
        (pt, pb), (pl, pr) = layer["padding"]
        kh, kw, cin, cout = w.shape
        if cin != in_shape[2]:
            raise ValueError(f"layer {name}: weight expects {cin} input channels, input has {in_shape[2]}")
        s = int(layer["stride"])
        ho = (in_shape[0] + pt + pb - kh) // s + 1
        wo = (in_shape[1] + pl + pr - kw) // s + 1
        out = [ho, wo, cout]
    else:
        k = int(np.prod(in_shape))
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"layer {name}: dense weight {list(w.shape)} does not match "
                             f"flattened input of size {k}")
        out = [w.shape[1]]
    pool = layer.get("pool")
    if pool is not None:
        if layer["kind"] != "conv" or int(pool) < 1:
            raise ValueError(f"layer {name}: pool must be None or an int >= 1 on a conv layer")
        out = [out[0] // int(pool), out[1] // int(pool), out[2]]
    if min(out) < 1:
        raise ValueError(f"layer {name}: empty output shape {out}")
    return out


def _validate_layer(layer: dict, index: int, n_layers: int) -> tuple[str, int]:
    name = str(layer.get("name", f"layer{index}"))
    if layer.get("kind") not in ("conv", "dense"):
        raise ValueError(f"layer {name}: kind must be 'conv' or 'dense', got {layer.get('kind')!r}")
    if layer.get("output") not in OUTPUT_OPS:
        raise ValueError(f"layer {name}: output must be one of {OUTPUT_OPS}, got {layer.get('output')!r}")
    last = index == n_layers - 1
    if (layer["output"] == "requant_out") != last:
        raise ValueError(f"layer {name}: 'requant_out' (int32 logits) must be the last layer's output, and only its")
    check_codes(layer["weight"], layer["w_bits"], f"layer {name}")
    if layer["kind"] == "conv":
        pad = np.asarray(layer.get("padding"))
        w = np.asarray(layer["weight"])
        if pad.shape != (2, 2) or pad.min() < 0 or int(layer.get("stride", 0)) < 1:
            raise ValueError(f"layer {name}: conv needs stride >= 1 and padding [[t,b],[l,r]] >= 0")
        if w.ndim == 4 and np.any(pad >= np.asarray(w.shape[:2])[:, None]):
            raise ValueError(f"layer {name}: padding {pad.tolist()} must be below the kernel size {list(w.shape[:2])}")
    if layer["output"] == "requant_relu":
        a = layer.get("a_bits")
        if not isinstance(a, (int, np.integer)) or not 1 <= a <= 8:
            raise ValueError(f"layer {name}: requant_relu needs a_bits in 1..8, got {a!r}")
    return name, int(layer["w_bits"])


def _requant_consts(layer: dict, name: str, cout: int):
    m = _int_array(layer["multiplier"], np.int32, f"layer {name} multiplier").reshape(-1)
    s = _int_array(layer["shift"], np.int32, f"layer {name} shift").reshape(-1)
    for arr, what in ((m, "multiplier"), (s, "shift")):
        if arr.shape[0] not in (1, cout):
            raise ValueError(f"layer {name}: {what} must have shape [1] or [{cout}], got {list(arr.shape)}")
    if m.min() <= 0:
        raise ValueError(f"layer {name}: multipliers must be > 0, got min {int(m.min())}")
    if s.min() < 0 or s.max() > 62:
        raise ValueError(f"layer {name}: shifts must lie in [0, 62], got [{int(s.min())}, {int(s.max())}]")
    return m, s


def accumulator_bound(k: int, max_w: int, max_x: int, max_bias: int) -> tuple[int, int]:
    """Static worst-case |acc| and the int32 headroom bits left above it (Python ints)."""
    bound = int(k) * int(max_w) * int(max_x) + int(max_bias)
    return bound, 31 - bound.bit_length()


def _json_default(obj):
    """Let config/metrics carry numpy scalars and arrays."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sealed_manifest_bytes(manifest: dict) -> bytes:
    """manifest.json's bytes, carrying `manifest_sha256`: the sha256 of these same bytes
    with that field's 64 hex digits written as '0' (docs/artifact-format.md)."""
    body = {k: v for k, v in manifest.items() if k != SEAL_FIELD}
    head = {k: body.pop(k) for k in ("format", "format_version") if k in body}
    body = {**head, SEAL_FIELD: "0" * 64, **body}
    text = json.dumps(body, indent=1, default=_json_default).encode()
    slot = f'"{SEAL_FIELD}": "'.encode()
    if text.count(slot) != 1:
        raise ValueError(f"config and metrics must not hold a key named {SEAL_FIELD!r}")
    i = text.index(slot) + len(slot)
    return text[:i] + hashlib.sha256(text).hexdigest().encode() + text[i + 64:]


def write_manifest(out_dir, manifest: dict) -> dict:
    """(Re)write `out_dir/manifest.json` sealed with its own sha256; return it as read back.
    The one way to change a manifest (e.g. its metrics) that the loader will still accept."""
    blob = sealed_manifest_bytes(manifest)
    epath.Path(out_dir, MANIFEST_FILE).write_bytes(blob)
    return json.loads(blob)


def write_artifact(out_dir, *, layers, input_spec, config, metrics, format_version=FORMAT_VERSION) -> dict:
    """Write `model.safetensors` + `manifest.json` into `out_dir`; return the manifest."""
    if format_version != FORMAT_VERSION:
        raise ValueError(f"this writer produces format_version {FORMAT_VERSION}, not {format_version!r}")
    shape = [int(v) for v in input_spec["shape"]]
    pad_value = [int(v) for v in input_spec["pad_value"]]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input shape must be [H, W, C] > 0, got {shape}")
    if len(pad_value) != shape[2] or min(pad_value) < 0 or max(pad_value) > 255:
        raise ValueError(f"input pad_value must be {shape[2]} ints in 0..255, got {pad_value}")
    if not layers:
        raise ValueError("an artifact needs at least one layer")

    tensors, graph, tensor_meta = {}, [], {}
    ideal = 0
    cur, max_x = shape, 255
    for i, layer in enumerate(layers):
        name, bits = _validate_layer(layer, i, len(layers))
        w = np.asarray(layer["weight"])
        cout = int(w.shape[-1])
        in_shape = list(cur)
        cur = _out_shape(layer, cur, name)
        bias = _int_array(layer["bias"], np.int32, f"layer {name} bias")
        if bias.shape != (cout,):
            raise ValueError(f"layer {name}: bias must have shape [{cout}], got {list(bias.shape)}")
        mult, shift = _requant_consts(layer, name, cout)
        k = int(np.prod(w.shape[:-1]))
        max_w = int(np.abs(w.astype(np.int64)).max())
        max_b = int(np.abs(bias.astype(np.int64)).max())
        bound, headroom = accumulator_bound(k, max_w, max_x, max_b)
        if bound > INT32_MAX:
            raise ValueError(f"layer {name}: worst-case accumulator {k}*{max_w}*{max_x}+{max_b} = {bound} "
                             f"overflows int32 (max {INT32_MAX})")
        keys = {"weight": f"{i}.w", "bias": f"{i}.b", "multiplier": f"{i}.m", "shift": f"{i}.s"}
        tensors[keys["weight"]] = pack_codes(w, bits)
        tensors[keys["bias"]], tensors[keys["multiplier"]], tensors[keys["shift"]] = bias, mult, shift
        for key in keys.values():
            tensor_meta[key] = {"dtype": tensors[key].dtype.name, "shape": list(tensors[key].shape)}
        ideal += w.size * bits / 8 + 4 * (bias.size + mult.size + shift.size)
        out = layer["output"]
        a_bits = int(layer["a_bits"]) if out == "requant_relu" else (1 if out == "sign" else 32)
        entry = {"name": name, "kind": layer["kind"], "w_bits": bits, "weight_shape": list(w.shape),
                 "tensors": keys, "output": out, "a_bits": a_bits,
                 "pool": None if layer.get("pool") is None else int(layer["pool"]),
                 "in_shape": in_shape, "out_shape": cur, "k": k, "max_abs_input": max_x,
                 "acc_bound": bound, "headroom_bits": headroom}
        if layer["kind"] == "conv":
            entry["stride"] = int(layer["stride"])
            entry["padding"] = [[int(v) for v in row] for row in layer["padding"]]
        graph.append(entry)
        max_x = 2**a_bits - 1 if out == "requant_relu" else 1

    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = safetensors_bytes(tensors)
    (out_dir / TENSORS_FILE).write_bytes(blob)
    digest, nbytes = hashlib.sha256(blob).hexdigest(), len(blob)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tensors_file": TENSORS_FILE, "tensors_sha256": digest,
        "input": {"shape": shape, "dtype": "uint8", "layout": "NHWC", "pad_value": pad_value},
        "packing": {"scheme": "lsb-first-bitstream", "signed": "two's complement b-bit fields (b>=2); "
                    "b=1: bit 1 = +1, bit 0 = -1", "unpacked_bits": [8]},
        "layers": graph, "tensors": tensor_meta,
        "size": {"tensors_file_bytes": nbytes, "ideal_bytes": int(np.ceil(ideal)),
                 "ratio": nbytes / max(ideal, 1.0)},
        "config": config, "metrics": metrics,
    }
    return write_manifest(out_dir, manifest)
