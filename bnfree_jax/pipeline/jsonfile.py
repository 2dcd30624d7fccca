"""The job's JSON files (config.json, phases.json, sweep results): written atomically so a
crash never leaves half a file, read with a one-line error naming the file and the way out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path, remedy: str, kind: type | None = dict) -> Any:
    """The parsed file; a truncated, garbage or wrong-typed one is a ValueError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e}); {remedy}") from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; {remedy}")
    return value


def write_json(path, value: Any, **dump_kw) -> None:
    """Write through a temporary file and a rename (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, **dump_kw))
    os.replace(tmp, path)
