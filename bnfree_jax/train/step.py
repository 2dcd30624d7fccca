"""Data-parallel train and eval steps: ``jit`` over ``shard_map`` with explicit collectives.

The per-device function sees its shard of the batch and the replicated state,
and averages what must agree across devices with ``lax.pmean`` over ``'data'``
(pmap semantics, written out).  ``check_vma=False`` keeps those semantics:
gradients are per-device until we average them ourselves, so a model's
``nn.BatchNorm(axis_name='data')`` and our ``pmean`` compose as under ``pmap``.

``frozen`` (teacher params, frozen layers, cached targets...) is an argument,
never a closure constant: it is not baked into the compiled program and gets no
gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend import core as jex_core
from jax.sharding import Mesh, PartitionSpec as P

from bnfree_jax.nn.network import compute_dtype_scope
from bnfree_jax.train.mesh import DATA_AXIS
from bnfree_jax.train.state import TrainState

LossFn = Callable[[Any, Any, Any, Any, jax.Array], tuple[jax.Array, tuple[Any, dict]]]
ApplyFn = Callable[[Any, Any, Any, jax.Array], jax.Array]


def _pmean_floats(tree: Any) -> Any:
    """Average inexact leaves over ``'data'``; integer leaves are equal on all devices."""
    def avg(x):
        return lax.pmean(x, DATA_AXIS) if jnp.issubdtype(x.dtype, jnp.inexact) else x
    return jax.tree.map(avg, tree)


def device_gradients(loss_fn: LossFn, state: TrainState, frozen: Any, batch: Any, compute_dtype=None):
    """(model state, metrics with 'loss', gradients, next rng) of one step, averaged over ``'data'``:
    what the training step computes before its update, shared with the diagnostics probe
    (``train.diagnostics``) so that its gradients are the step's own (same rng, same dtype)."""
    step_rng, next_rng = jax.random.split(state.rng)
    dev_rng = jax.random.fold_in(step_rng, lax.axis_index(DATA_AXIS))

    def objective(params):
        loss, (new_ms, metrics) = loss_fn(params, state.model_state, frozen, batch, dev_rng)
        return loss.astype(jnp.float32), (new_ms, metrics)

    with compute_dtype_scope(compute_dtype):
        (loss, (new_ms, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params)
    grads = lax.pmean(grads, DATA_AXIS)
    new_ms = _pmean_floats(new_ms)
    metrics = _pmean_floats({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
    metrics["loss"] = lax.pmean(loss, DATA_AXIS)
    return new_ms, metrics, grads, next_rng


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh, *,
                    donate: bool = True, compute_dtype=None):
    """Build ``step(state, frozen, batch) -> (state, metrics)``, jitted over ``mesh``.

    ``loss_fn(params, model_state, frozen, batch, rng) -> (loss, (new_model_state,
    metrics))`` is written for one device's shard.  The step folds the device
    index into the rng (distinct dropout per device), differentiates w.r.t.
    ``params`` only, averages gradients, model state, loss and metrics over
    ``'data'``, applies ``tx`` and advances ``step`` and ``rng``.  With
    ``compute_dtype`` (e.g. ``jnp.bfloat16``) the loss is traced inside
    ``nn.network.compute_dtype_scope``: the project's networks run their convs and
    matmuls, forward and backward, on operands of that dtype with float32
    accumulation, while ``loss_fn`` still gets the float32 params and batch, so the
    quantizers, BN statistics, losses and optimizer state stay float32 (casting the
    params would change the weight codes).  ``metrics`` always contains ``'loss'``
    (float32).
    """

    def per_device(state: TrainState, frozen: Any, batch: Any):
        new_ms, metrics, grads, next_rng = device_gradients(loss_fn, state, frozen, batch, compute_dtype)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, model_state=new_ms,
                                  opt_state=opt_state, rng=next_rng)
        return new_state, metrics

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                           out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())


def make_eval_step(apply_fn: ApplyFn, mesh: Mesh, *, image_key: str = "image",
                   label_key: str = "label", mask_key: str = "mask"):
    """Build ``eval_step(params, model_state, frozen, batch) -> {'correct', 'count'}``.

    ``apply_fn(params, model_state, frozen, images) -> logits``.  Padded examples
    (``batch[mask_key] == 0``) are not counted; sums are ``psum``-ed over
    ``'data'`` so every process gets the global totals (int32).
    """

    def per_device(params, model_state, frozen, batch):
        logits = apply_fn(params, model_state, frozen, batch[image_key])
        labels = batch[label_key]
        mask = batch.get(mask_key)
        if mask is None:
            mask = jnp.ones(labels.shape[:1], jnp.int32)
        mask = mask.astype(jnp.int32)
        hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32)
        correct = lax.psum(jnp.sum(hit * mask), DATA_AXIS)
        count = lax.psum(jnp.sum(mask), DATA_AXIS)
        return {"correct": correct, "count": count}

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(DATA_AXIS)),
                           out_specs=P(), check_vma=False)
    return jax.jit(mapped)


CONV_DOT = ("conv_general_dilated", "dot_general")


def conv_dot_operand_dtypes(closed_jaxpr) -> list[tuple[str, tuple[str, ...]]]:
    """(primitive, operand dtypes) of every convolution and matmul in a jaxpr, sub-jaxprs
    included (pjit, shard_map, custom_vjp/jvp, scan, cond): what a step really multiplies
    in, to check a compute dtype against."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in CONV_DOT:
                found.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars)))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found
