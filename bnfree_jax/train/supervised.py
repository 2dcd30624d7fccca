"""Supervised training of a classifier (the float BN teacher and its QAT fine-tune; also a
BN-free float network, the from-scratch reference of bench/bn_free_scratch.py):
cross-entropy with batch statistics, if any, synced over the data axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnfree_jax.train.evaluate import evaluate_top1
from bnfree_jax.train.optim import make_optimizer, make_schedule
from bnfree_jax.train.phase import train_phase
from bnfree_jax.train.state import create_train_state
from bnfree_jax.train.streams import stream_key, stream_seed


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


def init_variables(net, image_shape, key):
    """Host (numpy) variables of `net` initialised from the typed key `key`."""
    dummy = jnp.zeros((1, *image_shape), jnp.uint8)
    return jax.device_get(net.init(key, dummy, train=False))


def graft(target, source):
    """Copy every leaf of `source` whose path exists in `target` (e.g. float → QAT teacher)."""
    if isinstance(target, dict):
        return {k: graft(v, source[k]) if isinstance(source, dict) and k in source else v
                for k, v in target.items()}
    return np.asarray(source, dtype=target.dtype) if np.shape(source) == np.shape(target) else target


def train_bn_network(phase: str, net, variables, steps: int, batch: int, optim_cfg, *, rt, feed,
                     ckpt_dir, seed: int):
    """Train a classifier with cross-entropy, resumably; returns (variables, top-1 on the
    feed's evaluation split). Its data order and step rng are the job's `phase` streams;
    its collections other than `params` (BN's batch_stats, none for a BN-free network)
    are the model state."""
    tx = make_optimizer(optim_cfg, steps)  # its schedule is make_schedule(optim_cfg, steps)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    state = create_train_state(variables["params"], tx, model_state=model_state,
                               rng=stream_key(seed, f"{phase}/step"))
    batches = feed.train_batches(batch, stream_seed(seed, f"{phase}/data"), rt.mesh)
    state, _ = train_phase(phase, ckpt_dir, state, {}, classification_loss(net), tx, batches, steps, rt,
                           lr=make_schedule(optim_cfg, steps))
    model_state = jax.device_get(state.model_state)
    out = {"params": jax.device_get(state.params), **model_state}
    apply_fn = lambda p, ms, fr, x: net.apply({"params": p, **ms}, x, train=False)
    top1 = evaluate_top1(apply_fn, out["params"], model_state, {}, feed, rt.mesh)
    return out, top1
