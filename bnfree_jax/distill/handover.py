"""Stage ℓ's conversion under `ptl.layer_target="tandem"`: S_ℓ is re-derived from T'_ℓ as
the earlier stages' compensation left it (BN folded into it, then α, β fitted in closed
form on the student's own input path), so what T' learned carries into the student
instead of being discarded when its layer is replaced."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from bnfree_jax.distill.fold import fold_layer
from bnfree_jax.distill.least_squares import accumulate_stats, affine_stats, fit_affine, unit_scale
from bnfree_jax.distill.plan import TRAINABLE, UNUSED, Stage
from bnfree_jax.distill.tandem import tandem_roles, tandem_variables


def needs_handover(plan, k: int) -> bool:
    """Stage k replaces T' layers that an earlier stage trained (compensation on)."""
    stage = plan[k]
    if stage.kind != "tandem" or stage.labels.get(f"T:{stage.layer_name}") in (None, UNUSED):
        return False
    return any(p.labels.get(f"T:{stage.layer_name}") == TRAINABLE for p in plan[:k])


def hand_over_all(nets, stage: Stage, trees, refit: bool, batches):
    """Hand over every layer the stage converts, in order, each fitted on the output of the
    student layers before it; returns (trees, {layer: relative residual})."""
    residuals = {}
    for l in stage.converts:
        one = dataclasses.replace(stage, layer=l, first=0)
        trees, rel = hand_over(nets, one, trees, refit, batches)
        if rel is not None:
            residuals[one.layer_name] = rel
    return trees, residuals


def _path_stats(tandem_net, target_net, l: int, S: dict, T: dict, Tbs: dict, images):
    """Statistics of S_ℓ's raw op output against T'_ℓ, both on the student's input."""
    name = tandem_net.specs[l - 1].name
    variables = tandem_variables(tandem_net.specs, l, {**S, name: unit_scale(S[name])}, T, Tbs)
    h = tandem_net.apply(variables, images, stop=l - 1) if l > 1 else images
    _, trace = tandem_net.apply(variables, h, start=l - 1, stop=l, capture=True)
    _, target = target_net.apply(tandem_variables(tandem_net.specs, l - 1, S, T, Tbs), h,
                                 start=l - 1, stop=l, capture=True)
    return affine_stats(trace[0][1], target[0][1])


def hand_over(nets, stage: Stage, trees, refit: bool, batches, num_batches: int = 4):
    """(trees with S_ℓ folded from T'_ℓ, relative residual of the α/β fit or None);
    `nets` is the job's `NetFactory`."""
    L = len(nets.layer_names)
    l = stage.layer
    tandem_net = nets.network(tandem_roles(L, l))
    spec = tandem_net.specs[l - 1]
    folded = fold_layer(spec, trees.T[spec.name], trees.Tbs.get(spec.name),
                        tandem_net.inv_std if l == 1 else None, tandem_net.per_channel)
    S = {**trees.S, spec.name: folded}
    rel: Optional[float] = None
    if refit:
        target_net = nets.network(tandem_roles(L, l - 1))
        stats = jax.jit(lambda S, T, Tbs, x: _path_stats(tandem_net, target_net, l, S, T, Tbs, x))
        acc = accumulate_stats(lambda x: stats(S, trees.T, trees.Tbs, x), batches, num_batches)
        alpha, beta, rel = fit_affine(acc, tandem_net.per_channel)
        S[spec.name] = {**folded, "alpha": alpha, "beta": beta}
    return dataclasses.replace(trees, S=S), rel
