"""Integer-only audits.

* `audit_float_ops`: jaxpr equations that touch floating point, recursively. Sub-jaxprs
  are found generically in equation params (pjit/jit, closed_call, custom_jvp/custom_vjp,
  cond branches, while cond/body, scan, remat, shard_map...), so a float hidden in any
  nested computation is counted.
* `audit_artifact`: the artifact's files read raw (the safetensors header and the
  manifest's layer entries, not the validating loader, which would refuse the very
  artifacts worth auditing): float tensors, ops outside the integer op set, tensors and
  ops named like a normalisation, tensors no layer uses.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from etils import epath

from bnfree_jax.intsim.loader import KINDS, OUTPUT_OPS, ArtifactError


def _is_float(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(np.issubdtype(np.dtype(dtype), np.inexact))
    except TypeError:       # extended dtypes (PRNG keys, tokens) are not floats
        return False


def _sub_jaxprs(value):
    """Yield every Jaxpr inside a param value (ClosedJaxpr, Jaxpr, or nested sequences)."""
    if hasattr(value, "eqns") and hasattr(value, "invars"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _sub_jaxprs(v)


def _walk(jaxpr, path: str, found: list, seen: set) -> None:
    if id(jaxpr) in seen:
        return
    seen.add(id(jaxpr))
    for eqn in jaxpr.eqns:
        atoms = list(eqn.invars) + list(eqn.outvars)
        bad = [str(a.aval.dtype) for a in atoms if _is_float(getattr(a, "aval", None))]
        name = eqn.primitive.name
        if bad:
            found.append(f"{path}{name}: {', '.join(sorted(set(bad)))}")
        for key, value in eqn.params.items():
            for sub in _sub_jaxprs(value):
                _walk(sub, f"{path}{name}[{key}]/", found, seen)


def audit_float_ops(fn, *example_args, max_examples: int = 20) -> dict:
    """Trace `fn(*example_args)` with `jax.make_jaxpr` and count float equations.

    Returns {'count': int, 'examples': [str, ...]} ('path/primitive: dtypes')."""
    closed = jax.make_jaxpr(fn)(*example_args)
    found: list[str] = []
    _walk(closed.jaxpr, "", found, set())
    return {"count": len(found), "examples": found[:max_examples]}


# Name tokens that denote a normalisation op or its parameters / statistics.
NORM_TOKENS = frozenset({"bn", "ln", "gn", "mean", "var", "variance", "running", "moving", "gamma",
                         "beta", "eps", "epsilon"})


def denotes_normalisation(text: str) -> bool:
    """Whether a name or op kind looks like a normalisation: a token (split on case changes,
    non-alphanumerics and digits) containing 'norm' or in NORM_TOKENS. 'bnfree', 'conv1'
    and 'fc6' are not; 'bn1', 'BatchNorm_0', 'conv1.bn.running_var', 'layer_norm' are."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(text)).lower()
    return any("norm" in tok or tok in NORM_TOKENS for tok in re.split(r"[^a-z]+", spaced) if tok)


def _safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file (u64 little-endian length, then JSON), unparsed data."""
    path = epath.Path(path)
    size = path.stat().length
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or not 0 < n <= size - 8:
            raise ArtifactError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path}: safetensors header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: safetensors header must be a JSON object")
    return header


def _strings(value):
    """Every string inside a JSON value: keys and values, recursively."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _floats(value) -> int:
    """Number of JSON floats inside a value (an integer manifest's layers hold none)."""
    if isinstance(value, float):
        return 1
    if isinstance(value, dict):
        return sum(_floats(v) for v in value.values())
    if isinstance(value, list):
        return sum(_floats(v) for v in value)
    return 0


def _layer_findings(entry, index: int, found: dict) -> set:
    """Count one manifest layer's findings into `found`; return the tensor names it uses."""
    if not isinstance(entry, dict):
        found["non_integer_ops"].append(f"layer {index}: not a JSON object")
        return set()
    name = f"layer {index} ({entry.get('name')!s})"
    for field, known in (("kind", KINDS), ("output", OUTPUT_OPS)):
        if entry.get(field) not in known:
            found["non_integer_ops"].append(f"{name}: {field} {entry.get(field)!r}")
    hits = sorted({t for t in _strings(entry) if denotes_normalisation(t)})
    if hits:
        found["normalisation"].append(f"{name}: {', '.join(hits)}")
    n_float = _floats(entry)
    if n_float:
        found["float_params"].append(f"{name}: {n_float} float value(s)")
    keys = entry.get("tensors")
    return {v for v in keys.values() if isinstance(v, str)} if isinstance(keys, dict) else set()


def audit_artifact(path) -> dict:
    """Audit an artifact directory for anything that is not integer-only.

    Returns counts {'tensors', 'layers', 'float_tensors' (header dtype F*/BF*),
    'float_params' (layers with JSON floats), 'non_integer_ops' (kind/output outside the
    integer op set), 'normalisation' (tensors + layers named like a normalisation),
    'unused_tensors' (in the file, used by no layer)} and 'examples' {key: [str, ...]}.
    Every count of a sound artifact is 0; a file that cannot be read is an ArtifactError."""
    path = os.fspath(path)
    try:
        manifest = json.loads(epath.Path(path, "manifest.json").read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: cannot read manifest.json: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise ArtifactError(f"{path}: manifest.json has no 'layers' list")
    tname = manifest.get("tensors_file", "model.safetensors")
    if not isinstance(tname, str) or os.path.basename(tname) != tname:
        raise ArtifactError(f"{path}: bad tensors_file {tname!r}")
    header = _safetensors_header(epath.Path(path, tname))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    found = {k: [] for k in ("float_tensors", "float_params", "non_integer_ops", "normalisation", "unused_tensors")}
    used = set()
    for i, entry in enumerate(manifest["layers"]):
        used |= _layer_findings(entry, i, found)
    for key, info in sorted(tensors.items()):
        dtype = str(info.get("dtype", "?")).upper() if isinstance(info, dict) else "?"
        if dtype.startswith(("F", "BF")):
            found["float_tensors"].append(f"{key}: {dtype}")
        if denotes_normalisation(key):
            found["normalisation"].append(f"tensor {key}")
        if key not in used:
            found["unused_tensors"].append(f"tensor {key}")
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and any(denotes_normalisation(t) for t in _strings(meta)):
        found["normalisation"].append("safetensors __metadata__")
    report = {"tensors": len(tensors), "layers": len(manifest["layers"])}
    report.update({k: len(v) for k, v in found.items()})
    report["examples"] = {k: v[:20] for k, v in found.items() if v}
    return report
