"""Phase 0: the float BN teacher, then its W/A-bit QAT fine-tune (BN kept)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnfree_jax.nn.network import TEACHER
from bnfree_jax.pipeline.evaluate import evaluate_top1
from bnfree_jax.pipeline.phase_runner import train_phase
from bnfree_jax.pipeline.phases import Ledger
from bnfree_jax.pipeline.variables import load_variables, save_variables
from bnfree_jax.train.optim import make_optimizer
from bnfree_jax.train.state import create_train_state


def classification_loss(net):
    """Per-device loss of a BN network in training mode (batch statistics synced over 'data')."""

    def loss_fn(params, model_state, frozen, batch, rng):
        del frozen, rng
        logits, updates = net.apply({"params": params, **model_state}, batch["image"], train=True,
                                    mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (dict(updates), {"accuracy": acc})

    return loss_fn


def init_variables(net, info, seed: int):
    dummy = jnp.zeros((1, *info.image_shape), jnp.uint8)
    return jax.device_get(net.init(jax.random.PRNGKey(seed), dummy, train=False))


def graft(target, source):
    """Copy every leaf of `source` whose path exists in `target` (e.g. float → QAT teacher)."""
    if isinstance(target, dict):
        return {k: graft(v, source[k]) if isinstance(source, dict) and k in source else v
                for k, v in target.items()}
    return np.asarray(source, dtype=target.dtype) if np.shape(source) == np.shape(target) else target


def train_bn_network(ctx, phase: str, net, variables, steps: int, batch: int, optim_cfg, seed_offset: int):
    """Train a BN network with cross-entropy; resumable; returns (variables, test top-1)."""
    tx = make_optimizer(optim_cfg, steps)
    params = variables["params"]
    model_state = {"batch_stats": variables["batch_stats"]}
    state = create_train_state(params, tx, model_state=model_state, rng=ctx.config.seed + seed_offset)
    batches = ctx.train_batches(batch, seed_offset=seed_offset)
    state = train_phase(ctx, phase, ctx.workdir / "checkpoints" / phase, state, {},
                        classification_loss(net), tx, batches, steps)
    out = {"params": jax.device_get(state.params), **jax.device_get(state.model_state)}
    apply_fn = lambda p, ms, fr, x: net.apply({"params": p, **ms}, x, train=False)
    top1 = evaluate_top1(ctx, apply_fn, out["params"], {"batch_stats": out["batch_stats"]}, {})
    return out, top1


def run_teacher_phases(ctx, ledger: Ledger, qat: bool = True):
    """Float teacher then QAT teacher, each skipped when the ledger says it is done."""
    c = ctx.config
    float_net = ctx.network(TEACHER, quantized=False, bn_axis_name="data")
    float_vars = init_variables(float_net, ctx.info, c.seed)
    path = ctx.workdir / "teacher" / "variables"
    if ledger.done("teacher"):
        float_vars = load_variables(path, float_vars)
    else:
        float_vars, top1 = train_bn_network(ctx, "teacher", float_net, float_vars, c.teacher.steps,
                                            c.teacher.batch, c.teacher.optim, seed_offset=0)
        save_variables(path, float_vars)
        ledger.mark_done("teacher", top1=top1)
        ctx.log(f"[teacher] float BN teacher test top-1 {top1:.4f}")
    if not qat:
        return float_vars, None

    qat_net = ctx.network(TEACHER, quantized=True, bn_axis_name="data")
    qat_vars = init_variables(qat_net, ctx.info, c.seed + 1)
    path = ctx.workdir / "qat" / "variables"
    if ledger.done("qat"):
        qat_vars = load_variables(path, qat_vars)
    else:
        qat_vars = graft(qat_vars, float_vars)
        qat_vars, top1 = train_bn_network(ctx, "qat", qat_net, qat_vars, c.qat.steps, c.qat.batch,
                                          c.qat.optim, seed_offset=1)
        save_variables(path, qat_vars)
        ledger.mark_done("qat", top1=top1)
        ctx.log(f"[qat] W{c.model.w_bits}A{c.model.a_bits} QAT BN teacher test top-1 {top1:.4f}")
    return float_vars, qat_vars
