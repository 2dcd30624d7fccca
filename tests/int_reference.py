"""Independent numpy int64 reference interpreter of the artifact format.

Written from docs/artifact-format.md alone: it shares no code with the writer or with
bnfree_jax.intsim. Unpacking goes through one Python big integer per tensor; convs are
explicit padding + per-tap einsums in int64; requantisation is the int64 formula.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file


def unpack_reference(data: np.ndarray, bits: int, shape) -> np.ndarray:
    """Codes from a packed tensor: int8 as-is for b = 8, else an LSB-first bitstream."""
    shape = tuple(shape)
    if bits == 8:
        return np.asarray(data, np.int64).reshape(shape)
    stream = int.from_bytes(np.asarray(data, np.uint8).tobytes(), "little")
    count = int(np.prod(shape))
    mask = (1 << bits) - 1
    out = np.empty(count, np.int64)
    for i in range(count):
        f = (stream >> (i * bits)) & mask
        if bits == 1:
            out[i] = 1 if f else -1
        else:
            out[i] = f - (1 << bits) if f >= 1 << (bits - 1) else f
    return out.reshape(shape)


def requant_reference(acc, mult, shift):
    """(acc*M + 2^(s-1)) >> s in int64 (arithmetic shift = floor); 2^(s-1) := 0 for s = 0."""
    acc, mult, shift = (np.asarray(v, np.int64) for v in (acc, mult, shift))
    rounding = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    return (acc * mult + rounding) >> shift


def layer_acc(entry: dict, x: np.ndarray, w: np.ndarray, bias: np.ndarray, pad_value) -> np.ndarray:
    """int64 accumulator of one layer on int64 input codes x (pad_value: per channel or 0)."""
    if entry["kind"] == "dense":
        return x.reshape(x.shape[0], -1) @ w + bias
    n, h, wd, c = x.shape
    (pt, pb), (pl, pr) = entry["padding"]
    s = entry["stride"]
    kh, kw, _, cout = w.shape
    xp = np.empty((n, h + pt + pb, wd + pl + pr, c), np.int64)
    xp[...] = np.asarray(pad_value, np.int64)
    xp[:, pt:pt + h, pl:pl + wd, :] = x
    ho, wo = (h + pt + pb - kh) // s + 1, (wd + pl + pr - kw) // s + 1
    acc = np.zeros((n, ho, wo, cout), np.int64)
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
            acc += np.einsum("nhwc,co->nhwo", tap, w[i, j])
    return acc + bias


def output_stage(entry: dict, acc: np.ndarray, mult, shift) -> np.ndarray:
    op = entry["output"]
    if op == "sign":
        return np.where(acc >= 0, 1, -1).astype(np.int64)
    y = requant_reference(acc, mult, shift)
    if op == "requant_relu":
        return np.clip(y, 0, 2 ** entry["a_bits"] - 1)
    return np.clip(y, -(2**31), 2**31 - 1)


def max_pool(y: np.ndarray, k: int) -> np.ndarray:
    n, h, w, c = y.shape
    out = np.full((n, h // k, w // k, c), np.iinfo(np.int64).min, np.int64)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, y[:, i:(h // k) * k:k, j:(w // k) * k:k, :])
    return out


def reference_run(art_dir, images: np.ndarray, *, return_accs: bool = False):
    """int64 logits of uint8 NHWC images, straight from manifest.json + model.safetensors."""
    with open(os.path.join(art_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    tensors = load_file(os.path.join(art_dir, manifest["tensors_file"]))
    x = np.asarray(images, np.int64)
    accs = []
    for i, entry in enumerate(manifest["layers"]):
        keys = entry["tensors"]
        w = unpack_reference(tensors[keys["weight"]], entry["w_bits"], entry["weight_shape"])
        pad = manifest["input"]["pad_value"] if i == 0 else 0
        acc = layer_acc(entry, x, w, tensors[keys["bias"]].astype(np.int64), pad)
        assert np.abs(acc).max() <= 2**31 - 1, f"layer {entry['name']}: reference acc overflows int32"
        accs.append(acc)
        x = output_stage(entry, acc, tensors[keys["multiplier"]], tensors[keys["shift"]])
        if entry.get("pool"):
            x = max_pool(x, entry["pool"])
    return (x, accs) if return_accs else x


# ---- random students for the tests (inputs only; the reference above stays spec-only) ----

def _requant_params(rng, q: np.ndarray, target: int):
    """Multiplier(s) and shift(s) mapping a magnitude q to about `target`, M ~ 2^k, k random."""
    q = np.maximum(np.asarray(q, np.float64), 1.0)
    k = int(rng.integers(3, 31))
    ratio = target / q
    shift = np.clip(k - np.floor(np.log2(ratio)).astype(np.int64), 0, 62)
    mult = np.clip(np.round(ratio * 2.0 ** shift), 1, 2**31 - 1).astype(np.int64)
    return mult.astype(np.int32), shift.astype(np.int32)


def random_student(rng, images, specs, w_bits, a_bits, pad_value, out_target=3000):
    """Layers for write_artifact with random codes and biases, and requant constants chosen
    on `images` so that outputs spread over the code range. specs: dicts with kind, cout,
    and for conv k, stride, padding, pool. a_bits[i] == 1 means a sign layer."""
    x = np.asarray(images, np.int64)
    layers = []
    for i, spec in enumerate(specs):
        wb, last = w_bits[i], i == len(specs) - 1
        cin = x.shape[-1]
        shape = ((spec["k"], spec["k"], cin, spec["cout"]) if spec["kind"] == "conv"
                 else (int(np.prod(x.shape[1:])), spec["cout"]))
        if wb == 1:
            w = rng.choice(np.array([-1, 1]), size=shape)
        else:
            hi = 2 ** (wb - 1) - 1
            w = rng.integers(-hi, hi + 1, size=shape)
        entry = {"kind": spec["kind"], "stride": spec.get("stride", 1),
                 "padding": spec.get("padding", [[0, 0], [0, 0]]), "a_bits": a_bits[i]}
        dot = layer_acc(entry, x, w, np.zeros(spec["cout"], np.int64), pad_value if i == 0 else 0)
        flat = dot.reshape(-1, spec["cout"])
        output = "requant_out" if last else ("sign" if a_bits[i] == 1 else "requant_relu")
        entry["output"] = output
        if output == "sign":
            bias = -np.median(flat, axis=0).astype(np.int64) + rng.integers(-2, 3, spec["cout"])
        else:
            spread = max(1, int(flat.std()))
            bias = rng.integers(-spread, spread + 1, spec["cout"])
        acc = dot + bias
        if output == "requant_out":
            mult, shift = _requant_params(rng, np.abs(acc).max(), out_target)
            mult, shift = mult.reshape(1), shift.reshape(1)
        elif output == "requant_relu":
            per_channel = bool(rng.integers(0, 2))
            pos = np.maximum(acc.reshape(-1, spec["cout"]), 0)
            q = np.percentile(pos, 90, axis=0) if per_channel else np.percentile(pos, 90)
            mult, shift = _requant_params(rng, np.atleast_1d(q), 2 ** a_bits[i] - 1)
        else:
            mult, shift = np.ones(1, np.int32), np.zeros(1, np.int32)
        layer = {"name": f"{spec['kind']}{i}", "kind": spec["kind"], "weight": w.astype(np.int8),
                 "w_bits": wb, "bias": bias.astype(np.int32), "output": output,
                 "a_bits": a_bits[i] if output == "requant_relu" else None,
                 "multiplier": mult, "shift": shift, "pool": spec.get("pool")}
        if spec["kind"] == "conv":
            layer["stride"], layer["padding"] = entry["stride"], entry["padding"]
        layers.append(layer)
        x = output_stage(entry, acc, mult, shift)
        if spec.get("pool"):
            x = max_pool(x, spec["pool"])
    return layers
