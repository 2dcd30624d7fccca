"""Distillation losses: layer-wise target MSE, cross-entropy, and Hinton KD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mse(pred, target):
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def relative_mse(pred, target):
    """MSE over the target's variance: comparable across layers of different scale."""
    t = target.astype(jnp.float32)
    return mse(pred, t) / (jnp.var(t) + 1e-8)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def kd_loss(student_logits, teacher_logits, temperature: float):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), the usual scaling that keeps gradients O(1)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def task_losses(logits, labels, teacher_logits, weights: dict, temperature: float):
    """Weighted CE + KD as configured; returns (total, parts)."""
    parts = {}
    if weights.get("ce", 0.0):
        parts["ce"] = cross_entropy(logits, labels)
    if weights.get("kd", 0.0):
        parts["kd"] = kd_loss(logits, jax.lax.stop_gradient(teacher_logits), temperature)
    total = sum(weights[k] * v for k, v in parts.items())
    return total, parts
