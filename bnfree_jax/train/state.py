"""The train state: a plain pytree, so jit, shard_map and orbax treat it like any other."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    ``params`` is the trainable subtree only (gradients are taken w.r.t. it);
    ``model_state`` holds mutable collections such as ``{'batch_stats': ...}``
    (or ``{}``); ``rng`` is a typed PRNG key advanced once per step.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation, *,
                       model_state: Any = None, rng: jax.Array | int = 0) -> TrainState:
    """A fresh state at step 0 (``rng`` may be an int seed or a typed key)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state={} if model_state is None else model_state,
                      opt_state=tx.init(params), rng=rng)
