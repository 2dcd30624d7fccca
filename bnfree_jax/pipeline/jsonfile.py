"""The job's JSON files (config.json, phases.json, sweep results): written atomically so a
crash never leaves half a file, read with a one-line error naming the file and the way out."""

from __future__ import annotations

import json
from typing import Any

from bnfree_jax.data.storage import as_path, write_text_atomic


def read_json(path, remedy: str, kind: type | None = dict) -> Any:
    """The parsed file; a truncated, garbage or wrong-typed one is a ValueError naming it."""
    path = as_path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e}); {remedy}") from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; {remedy}")
    return value


def write_json(path, value: Any, **dump_kw) -> None:
    """Write whole or not at all (a rename locally, one upload to a bucket)."""
    write_text_atomic(path, json.dumps(value, **dump_kw))
