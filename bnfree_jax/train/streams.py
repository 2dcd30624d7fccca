"""Random streams of a job: one root key per job, every stream derived from it by
`fold_in` of a stable name, so two streams (phases, stages, seeds) never coincide by
arithmetic on seeds, and renaming a stream is the only way to change its draws."""

from __future__ import annotations

import hashlib

import jax


def _name_id(name: str) -> int:
    """A stable 31-bit id of a stream name (sha256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFFFFFF


def stream_key(root_seed: int, name: str) -> jax.Array:
    """The typed PRNG key of stream `name` in the job seeded `root_seed`."""
    return jax.random.fold_in(jax.random.key(int(root_seed)), _name_id(name))


def stream_seed(root_seed: int, name: str) -> int:
    """A 31-bit integer seed of stream `name`, for consumers that take ints (grain)."""
    data = jax.random.key_data(stream_key(root_seed, name))
    return int(jax.device_get(data).ravel()[-1]) & 0x7FFFFFFF
