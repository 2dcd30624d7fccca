"""Optimizers from a config, the staged (partitioned) optimizer, and moment carrying.

Config fields (``ml_collections.ConfigDict`` or anything with ``.get``):
``name`` ('sgd' | 'adamw'), ``lr``, ``momentum`` and ``nesterov`` (sgd), ``b1``,
``b2`` (adamw), ``weight_decay``, ``warmup_steps`` (int, or a fraction of
``total_steps`` when < 1), ``schedule`` ('cosine' | 'constant'), ``grad_clip``
(global norm, 0 = off), ``agc`` (``optax.adaptive_grad_clip`` factor, 0 = off),
``slow_lr_factor`` (staged form only).

Weight decay touches kernels only (``ndim > 1``), never biases, BN or scales.

Staged training, two usages:

* **Differentiate only the trainable subtree (preferred).**  ``params`` in the
  train state is the trainable subtree; frozen layers travel in the step's
  ``frozen`` argument.  Labels are then only ``'trainable'`` / ``'slow'`` and
  the optimizer state holds no moments for frozen layers at all.
* **One params tree with ``'frozen'`` labels.**  Frozen leaves get
  ``optax.set_to_zero()`` (no state); global-norm clipping and AGC are masked
  to non-frozen leaves, so frozen gradients never inflate the norm, and decay
  lives inside the non-frozen groups, so it never leaks onto frozen params.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import jax
import optax

LABELS = ("trainable", "slow", "frozen")


def _get(cfg: Any, name: str, default: Any) -> Any:
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None else value


def warmup_steps_of(cfg: Any, total_steps: int) -> int:
    """``warmup_steps`` as a step count (a float < 1 is a fraction of ``total_steps``)."""
    w = _get(cfg, "warmup_steps", 0)
    if isinstance(w, float) and 0 < w < 1:
        return int(round(w * total_steps))
    return int(w)


def make_schedule(cfg: Any, total_steps: int, scale: float = 1.0) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at ``total_steps`` or constant."""
    peak = float(_get(cfg, "lr", 1e-3)) * scale
    warmup = min(warmup_steps_of(cfg, total_steps), max(total_steps, 1))
    kind = _get(cfg, "schedule", "cosine")
    rest = max(total_steps - warmup, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, rest)
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {kind!r} (expected 'cosine' or 'constant')")
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim > 1, params)


def _base(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The per-group optimizer: weight decay (kernels only) and the update rule."""
    name = _get(cfg, "name", "sgd")
    wd = float(_get(cfg, "weight_decay", 0.0))
    if name == "sgd":
        parts = []
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=_decay_mask))
        momentum = float(_get(cfg, "momentum", 0.9)) or None
        parts.append(optax.sgd(schedule, momentum=momentum,
                               nesterov=bool(_get(cfg, "nesterov", False))))
        return optax.chain(*parts)
    if name == "adamw":
        return optax.adamw(schedule, b1=float(_get(cfg, "b1", 0.9)),
                           b2=float(_get(cfg, "b2", 0.999)), weight_decay=wd,
                           mask=_decay_mask)
    raise ValueError(f"unknown optimizer {name!r} (expected 'sgd' or 'adamw')")


def _clipping(cfg: Any) -> list[optax.GradientTransformation]:
    parts = []
    if float(_get(cfg, "grad_clip", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    if float(_get(cfg, "agc", 0.0)) > 0:
        parts.append(optax.adaptive_grad_clip(float(cfg.agc)))
    return parts


def make_optimizer(cfg: Any, total_steps: int, labels: Any = None) -> optax.GradientTransformation:
    """Clip → AGC → (decay + sgd | adamw) over all params; with ``labels``, the staged form."""
    if labels is not None:
        return make_staged_optimizer(cfg, total_steps, labels)
    return optax.chain(*_clipping(cfg), _base(cfg, make_schedule(cfg, total_steps)))


def make_staged_optimizer(cfg: Any, total_steps: int,
                          labels: Any | Callable[[Any], Any]) -> optax.GradientTransformation:
    """``optax.partition`` over labels 'trainable' | 'slow' (lr × ``slow_lr_factor``) | 'frozen'.

    ``labels`` is a pytree of label strings matching params (or a function of
    params returning one).  Clipping and AGC are masked to non-frozen leaves.
    """
    def label_tree(params):
        return labels(params) if callable(labels) else labels

    def trainable_mask(params):
        return jax.tree.map(lambda lab: lab != "frozen", label_tree(params))

    slow = float(_get(cfg, "slow_lr_factor", 0.1))
    groups: dict[Hashable, optax.GradientTransformation] = {
        "trainable": _base(cfg, make_schedule(cfg, total_steps)),
        "slow": _base(cfg, make_schedule(cfg, total_steps, scale=slow)),
        "frozen": optax.set_to_zero(),
    }
    clips = [optax.masked(t, trainable_mask) for t in _clipping(cfg)]
    return optax.chain(*clips, optax.partition(groups, labels))


def path_labels(params: Any, rule: Callable[[tuple[str, ...]], str]) -> Any:
    """Label each leaf by ``rule(path)``, ``path`` being the tuple of its key names."""
    def label(path, _):
        names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                      for k in path)
        lab = rule(names)
        if lab not in LABELS:
            raise ValueError(f"label {lab!r} for {'/'.join(names)} is not one of {LABELS}")
        return lab
    return jax.tree_util.tree_map_with_path(label, params)


# --- carrying moments across a stage boundary ---------------------------------

def _canonical(prefix: tuple) -> tuple[str, ...]:
    """The moment's name: the attribute names along a state path (``('inner_state', 'mu')``).

    Sequence indices (position in a ``chain``) and dict keys (the ``partition``
    group) are dropped, so a parameter's Adam ``mu`` is found whether it was
    labelled 'trainable' or 'slow', and whether or not clipping was chained first.
    """
    return tuple(k.name for k in prefix if isinstance(k, jax.tree_util.GetAttrKey))


_AMBIGUOUS = object()


def _moment_index(opt_state: Any, params: Any) -> dict:
    """Map ``(moment name, param path) -> leaf`` for per-parameter state leaves."""
    param_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    index: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        split = _split(path, param_paths)
        if split is not None:
            key = (_canonical(split[0]), split[1])
            index[key] = _AMBIGUOUS if key in index else leaf
    return index


def _split(path: tuple, param_paths: set) -> tuple | None:
    for i in range(len(path)):
        if path[i:] in param_paths:
            return path[:i], path[i:]
    return None


def carry_moments(old_opt_state: Any, old_params: Any, new_opt_state: Any,
                  new_params: Any) -> Any:
    """Copy per-parameter optimizer state (Adam ``mu``/``nu``, SGD ``trace``...) from the
    old stage into a fresh new-stage state, for parameters present in both trainable
    subtrees with the same path and shape.

    How it walks the state: every leaf of an optimizer state is addressed by a
    key path; a leaf whose path ends with a parameter's path (e.g.
    ``….mu['params']['conv']['kernel']``) is that parameter's moment, and the
    attribute names along the rest of the path say which moment it is
    (``partition`` group names and ``chain`` positions are ignored).  A
    new-state leaf takes the old leaf with the same moment name, parameter
    path, shape and dtype; everything else (new parameters' moments, step
    counts, schedule counts) keeps the new state's value.
    """
    old = _moment_index(old_opt_state, old_params)
    param_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(new_params)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(new_opt_state)
    leaves = []
    for path, leaf in flat:
        split = _split(path, param_paths)
        src = None if split is None else old.get((_canonical(split[0]), split[1]))
        ok = (src is not None and src is not _AMBIGUOUS
              and getattr(src, "shape", None) == getattr(leaf, "shape", None)
              and getattr(src, "dtype", None) == getattr(leaf, "dtype", None))
        leaves.append(src if ok else leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)
