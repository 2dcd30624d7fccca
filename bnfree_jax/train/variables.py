"""Save and load a finished phase's model variables (params + BN statistics) with orbax."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from bnfree_jax.data.storage import Path, as_path


def save_variables(path: Path, variables) -> None:
    path = as_path(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.device_get(variables), force=True)


def load_variables(path: Path, like=None):
    """Load variables saved by `save_variables`; `like` (a tree of arrays) fixes structure/dtypes."""
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved variables at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if like is None:
            return ckptr.restore(path)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return ckptr.restore(path, abstract)
