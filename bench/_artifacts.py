"""Random-init alexnet_cifar students exported as integer artifacts (project venv).

Speed and size do not depend on accuracy, so the student is freshly initialised and run
through the real export path: `integerize` + `write_artifact`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bnfree_jax.export.artifact import write_artifact
from bnfree_jax.export.integerize import integerize
from bnfree_jax.nn.network import STUDENT, make_network
from bnfree_jax.nn.zoo import alexnet_cifar, with_bits

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
SHAPE = (32, 32, 3)


def student(w_bits: int, a_bits: int, first_last: int = 8, seed: int = 0):
    """(specs, net, params) of a random-init alexnet_cifar student."""
    specs = with_bits(alexnet_cifar(10), w_bits, a_bits, first_last)
    net = make_network(specs, STUDENT, MEAN, STD)
    params = jax.device_get(net.init(jax.random.key(seed), jnp.zeros((1, *SHAPE), jnp.uint8))["params"])
    return specs, net, params


def export(out_dir, w_bits: int, a_bits: int, first_last: int = 8, seed: int = 0):
    """Write the artifact; return (manifest, specs, net, params)."""
    specs, net, params = student(w_bits, a_bits, first_last, seed)
    layers, input_spec = integerize(specs, params, MEAN, STD, SHAPE, per_channel=False)
    manifest = write_artifact(str(out_dir), layers=layers, input_spec=input_spec,
                              config={"model": "alexnet_cifar", "w_bits": w_bits, "a_bits": a_bits}, metrics={})
    return manifest, specs, net, params
