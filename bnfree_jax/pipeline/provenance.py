"""Which code made a result, and on which devices: the git commit of the checkout the
package runs from (and whether tracked files had uncommitted changes), else the installed
package's version; and the device layout, which changes float summation order. Every
finished phase records both in the ledger, so a table row can name its commit and layout."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path  # the package's own location is always a local path


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                          check=True).stdout.strip()


@functools.lru_cache(maxsize=None)
def code_revision() -> dict:
    """{"commit": sha, "dirty": bool} from the package's checkout, or {"commit": None,
    "version": v} when the package is not in one (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel")).resolve() == root:
            return {"commit": _git(root, "rev-parse", "HEAD"),
                    "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        version = metadata.version("bnfree_jax")
    except metadata.PackageNotFoundError:
        version = None
    return {"commit": None, "version": version}


def device_layout() -> dict:
    """{"platform", "devices", "processes"} of the running JAX: the data-parallel layout a
    phase trained on (the same job on another layout agrees up to float summation order)."""
    import jax

    return {"platform": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count()}
