"""Gradient diagnostics of a phase, measured at its log steps (the steps metrics.jsonl gets).

A separate jitted probe, run by the loop on the log step's state and batch just before
the step itself (whose compiled program is untouched, so no training number changes):

- ``grad_norm/<layer>``: the L2 norm of the step's gradient over each layer's parameter
  subtree (``S/conv1``, ``T/conv2``, or ``conv1`` in a teacher phase);
- ``clip_hi/<name>`` / ``clip_lo/<name>``: the fraction of the values an activation
  quantizer sees (after pooling) that it saturates: ``x >= alpha`` at the top code, and
  ``x <= 0`` at the bottom one (``x <= -1`` for the 1-bit sign, whose range is [-1, 1]);
  in both the quantizer passes no gradient to x.  When a loss runs a layer several times
  (a teacher target, then the tandem network), the last run counts: the network trained;
- ``ste_cos/<name>`` (phases that train the student, the ``S`` tree): the cosine between
  the STE gradient (the step's) and the float network's gradient on the same batch and
  parameters, per student layer, over its weights (``act_alpha``, a quantizer parameter
  the float network does not use, left out).  The float network is the same loss traced
  inside ``nn.network.quantizers_bypassed()``: every student-role layer without its
  quantizers, the teacher and T' as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from bnfree_jax.nn.network import quantizers_bypassed, record_quantizer_inputs
from bnfree_jax.train.mesh import DATA_AXIS
from bnfree_jax.train.step import LossFn, device_gradients

STUDENT_TREE = "S"  # the student's groups in a distillation phase's params (distill/tandem.py)
QUANTIZER_PARAMS = ("act_alpha",)  # a student layer's parameters the float network does not use
PREFIXES = ("grad_norm/", "clip_hi/", "clip_lo/", "ste_cos/")


def layer_subtrees(tree: Any, path: str = "") -> dict[str, Mapping]:
    """{"S/conv1": subtree, ...}: a layer is the shallowest dict holding an array directly
    (a layer's ``kernel``), so a BN's ``scale``/``bias`` count with their layer."""
    if not isinstance(tree, Mapping):
        return {}
    if any(not isinstance(v, Mapping) for v in tree.values()):
        return {path: tree} if path else {"params": tree}
    out = {}
    for k, v in tree.items():
        out.update(layer_subtrees(v, f"{path}/{k}" if path else str(k)))
    return out


def _sq_norm(tree: Any) -> jax.Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
               jnp.zeros((), jnp.float32))


def grad_norms(grads: Any) -> dict[str, jax.Array]:
    """L2 norm of the gradient of each layer's parameter subtree."""
    return {f"grad_norm/{name}": jnp.sqrt(_sq_norm(sub)) for name, sub in layer_subtrees(grads).items()}


def clip_fractions(found: Mapping[str, tuple]) -> dict[str, jax.Array]:
    """Saturated fractions of each recorded quantizer input (see the module docstring)."""
    out = {}
    for name, (x, alpha, bits) in found.items():
        x = x.astype(jnp.float32)
        alpha = jnp.asarray(alpha, jnp.float32)
        low = -alpha if bits == 1 else jnp.zeros((), jnp.float32)
        out[f"clip_hi/{name}"] = jnp.mean((x >= alpha).astype(jnp.float32))
        out[f"clip_lo/{name}"] = jnp.mean((x <= low).astype(jnp.float32))
    return out


def _weights(layer: Mapping) -> dict:
    return {k: v for k, v in layer.items() if k not in QUANTIZER_PARAMS}


def cosine(a: Any, b: Any) -> jax.Array:
    """Cosine of two gradient trees as flat vectors (0 when either is zero)."""
    dot = sum((jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.zeros((), jnp.float32))
    return dot / jnp.maximum(jnp.sqrt(_sq_norm(a) * _sq_norm(b)), jnp.finfo(jnp.float32).tiny)


def ste_cosines(ste: Mapping, flt: Mapping) -> dict[str, jax.Array]:
    """Per student layer, the cosine of the STE and the float gradients over its weights."""
    return {f"ste_cos/{name}": cosine(_weights(ste[name]), _weights(flt[name])) for name in ste}


def trains_student(params: Any) -> bool:
    """Whether a phase's params hold student groups (the STE mismatch applies)."""
    return isinstance(params, Mapping) and bool(params.get(STUDENT_TREE))


def _recording(loss_fn: LossFn) -> LossFn:
    """`loss_fn` whose metrics also carry the clip fractions of the quantizers it runs
    (computed in its own trace, where the recorded inputs live)."""
    def wrapped(params, model_state, frozen, batch, rng):
        with record_quantizer_inputs() as found:
            loss, (new_ms, metrics) = loss_fn(params, model_state, frozen, batch, rng)
        return loss, (new_ms, {**metrics, **clip_fractions(found)})
    return wrapped


def diagnose(loss_fn: LossFn, state: Any, frozen: Any, batch: Any, compute_dtype=None) -> dict:
    """The diagnostics of one step on one device's shard (inside ``shard_map``)."""
    _, metrics, grads, _ = device_gradients(_recording(loss_fn), state, frozen, batch, compute_dtype)
    out = {k: v for k, v in metrics.items() if k.startswith("clip_")}
    out.update(grad_norms(grads))
    if trains_student(state.params):
        with quantizers_bypassed():
            _, _, flt, _ = device_gradients(loss_fn, state, frozen, batch, compute_dtype)
        out.update(ste_cosines(grads[STUDENT_TREE], flt[STUDENT_TREE]))
    return out


def make_diagnostics(loss_fn: LossFn, mesh: Mesh, *, compute_dtype=None) -> Callable:
    """``probe(state, frozen, batch) -> {key: scalar}`` jitted over ``mesh`` like the step
    (same sharding, same gradients); it donates nothing, so the step can run after it."""
    mapped = jax.shard_map(lambda s, f, b: diagnose(loss_fn, s, f, b, compute_dtype), mesh=mesh,
                           in_specs=(P(), P(), P(DATA_AXIS)), out_specs=P(), check_vma=False)
    return jax.jit(mapped)
