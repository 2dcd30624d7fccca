"""Closed-form least-squares fit of each student layer's IntScale (α, β) to the teacher.

For layer ℓ, with the student's quantised op output c (α=1, β=0) on the teacher's input and
the teacher's post-BN output t, minimise Σ (α·c + β_ch − t)². Per channel ch:
β_ch = t̄_ch − α·c̄_ch; α is one scalar pooled over channels (`requant="layer"`) or one per
channel (`"channel"`). Sufficient statistics accumulate over batches, so the fit scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.distill.tandem import teacher_targets


def _layer_stats(student_net, student_params, teacher_net, teacher_vars, images):
    """Per layer, per channel: n, Σc, Σt, Σc², Σct (α=1, β=0 in the student)."""
    _, t_trace = teacher_targets(teacher_net, teacher_vars, images)
    unit = {n: unit_scale(p) for n, p in student_params.items()}
    out = []
    for i, _ in enumerate(student_net.specs):
        x = images if i == 0 else t_trace[i - 1][0]
        _, tr = student_net.apply({"params": unit}, x, start=i, stop=i + 1, capture=True)
        out.append(affine_stats(tr[0][1], t_trace[i][1]))
    return out


def unit_scale(layer_params: dict) -> dict:
    """The layer with α = 1, β = 0: its output is the raw quantised op."""
    return {**layer_params, "alpha": jnp.ones_like(layer_params["alpha"]),
            "beta": jnp.zeros_like(layer_params["beta"])}


def affine_stats(c, t):
    """Per channel: n, Σc, Σt, Σc², Σct, Σt² of op outputs c and targets t."""
    c = c.reshape(-1, c.shape[-1])
    t = t.reshape(c.shape)
    return jnp.stack([jnp.full(c.shape[-1], c.shape[0], jnp.float32), c.sum(0), t.sum(0),
                      (c * c).sum(0), (c * t).sum(0), (t * t).sum(0)])


def accumulate_stats(stats_fn, batches, num_batches: int):
    """Sum `stats_fn(images)` (a pytree of statistics) over batches and over every host, so
    every host fits the same (α, β); returns numpy leaves."""
    acc = None
    for _ in range(num_batches):
        s = stats_fn(jnp.asarray(next(batches)["image"]))
        acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, acc)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(np.asarray(a))).sum(0), acc)


def fit_affine(stats: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(α, β, relative residual) from accumulated statistics of one layer."""
    n, sc, st, scc, sct, stt = (np.asarray(s, np.float64) for s in stats)
    cov = sct - sc * st / n
    var = scc - sc * sc / n
    if per_channel:
        alpha = np.where(var > 0, cov / np.maximum(var, 1e-12), 1.0)
    else:
        alpha = np.full_like(cov, cov.sum() / max(var.sum(), 1e-12))
    beta = (st - alpha * sc) / n
    resid = stt - 2 * alpha * sct - 2 * beta * st + alpha ** 2 * scc + 2 * alpha * beta * sc + n * beta ** 2
    t_var = stt - st * st / n
    rel = float(resid.sum() / max(t_var.sum(), 1e-12))
    a = alpha.astype(np.float32) if per_channel else np.float32(alpha[0])
    return a, beta.astype(np.float32), rel


def least_squares_init(student_net, student_params: dict, teacher_net, teacher_vars, batches,
                       num_batches: int = 4) -> tuple[dict, dict]:
    """Fit α, β of every layer; returns (new params, {layer: relative residual})."""
    stats_fn = jax.jit(lambda p, tv, x: _layer_stats(student_net, p, teacher_net, tv, x))
    acc = accumulate_stats(lambda x: stats_fn(student_params, teacher_vars, x), batches, num_batches)
    params, errors = dict(student_params), {}
    for spec, st in zip(student_net.specs, acc):
        alpha, beta, rel = fit_affine(st, student_net.per_channel)
        params[spec.name] = {**params[spec.name], "alpha": alpha, "beta": beta}
        errors[spec.name] = rel
    return params, errors
