"""Integer-only audit: count jaxpr equations that touch floating point, recursively.

Sub-jaxprs are found generically in equation params (pjit/jit, closed_call,
custom_jvp/custom_vjp, cond branches, while cond/body, scan, remat, shard_map...),
so a float hidden in any nested computation is counted.
"""

from __future__ import annotations

import jax
import numpy as np


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
