"""Run one stage of a plan on the shared step machinery: split trees, staged optimizer,
moment carry-over, checkpoints inside the stage, resume in the stage at its step."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

from bnfree_jax.distill.plan import FROZEN, SLOW, TRAINABLE, UNUSED, Stage
from bnfree_jax.distill.teacher_cache import CachedBatches, TeacherCache
from bnfree_jax.train.optim import carry_moments, make_schedule, make_staged_optimizer
from bnfree_jax.train.phase import train_phase
from bnfree_jax.train.state import create_train_state
from bnfree_jax.train.streams import stream_key, stream_seed


@dataclasses.dataclass
class Trees:
    """The evolving parameters of a distillation: student S, working teacher copy T'."""

    S: dict
    T: dict
    Tbs: dict  # T' BN statistics (inference mode, never updated)
    teacher: dict  # the original QAT teacher's variables (targets only)


def split(stage: Stage, trees: Trees) -> tuple[dict, dict, dict]:
    """(trainable params, frozen tree, optimizer labels) for a stage; a parameter's label
    is its group's unless the stage says otherwise (`Stage.param_label`)."""
    params, frozen, labels = {"S": {}, "T": {}}, {"S": {}, "T": {}}, {"S": {}, "T": {}}
    for group, label in stage.labels.items():
        role, name = group.split(":")
        src = trees.S if role == "S" else trees.T
        if label in (TRAINABLE, SLOW):
            params[role][name] = src[name]
            labels[role][name] = jax.tree_util.tree_map_with_path(
                lambda path, _: stage.param_label(group, path[0].key), src[name])
        elif label == FROZEN:
            frozen[role][name] = src[name]
        elif label != UNUSED:
            raise ValueError(f"unknown label {label!r} for {group}")
    frozen["Tbs"], frozen["teacher"] = trees.Tbs, trees.teacher
    return params, frozen, labels


def merge_back(trees: Trees, params: dict) -> Trees:
    host = jax.device_get(params)
    return dataclasses.replace(trees, S={**trees.S, **host.get("S", {})}, T={**trees.T, **host.get("T", {})})


def stage_state(stage: Stage, trees: Trees, optim_cfg, seed: int):
    """(fresh train state, frozen tree, optimizer) of a stage. The one place that builds a
    stage's state: a resumed job restores the previous stage's final state into exactly
    this structure, and its step rng is the stage's own stream of the job's root seed."""
    params, frozen, labels = split(stage, trees)
    tx = make_staged_optimizer(optim_cfg, max(stage.steps, 1), labels)
    return create_train_state(params, tx, rng=stream_key(seed, f"stage/{stage.name}/step")), frozen, tx


def stage_batches(env, stage: Stage, cache: Optional[TeacherCache] = None):
    """The stage's training batches (its own data stream); with a teacher cache they carry
    the teacher's logits and this stage's layer target."""
    batches = env.feed.train_batches(env.ptl.batch, stream_seed(env.seed, f"stage/{stage.name}/data"),
                                     env.rt.mesh)
    if cache is not None and stage.kind in ("tandem", "finetune"):
        batches = CachedBatches(batches, cache, layer=stage.layer)
    return batches


def run_stage(env, stage: Stage, trees: Trees, loss_fn, optim_cfg, ckpt_dir, *,
              prev: Optional[Any] = None, cache: Optional[TeacherCache] = None,
              fit: Optional[Callable[[Trees], tuple[Trees, dict]]] = None) -> tuple[Trees, Any, dict]:
    """Train one stage to its budget; returns (trees, final state, the stage's record).

    A fresh stage first runs `fit(trees) -> (trees, record)` (least squares, hand-over)
    and carries the previous stage's moments in; that starting point is checkpointed at
    step 0, so a resumed stage restores it instead of fitting again."""
    like, frozen, tx = stage_state(stage, trees, optim_cfg, env.seed)

    def start():
        fitted, record = fit(trees) if fit is not None else (trees, {})
        state, _, _ = stage_state(stage, fitted, optim_cfg, env.seed)
        if prev is not None:
            state = state.replace(opt_state=carry_moments(prev.opt_state, prev.params, state.opt_state,
                                                          state.params))
        return state, record

    state, record = train_phase(stage.name, ckpt_dir, like, frozen, loss_fn, tx, stage_batches(env, stage, cache),
                                stage.steps, env.rt, start=start,
                                lr=make_schedule(optim_cfg, max(stage.steps, 1)))  # the trainable group's
    return merge_back(trees, state.params), state, record
