"""Run one stage of a plan on the shared step machinery: split trees, staged optimizer,
moment carry-over, checkpoints inside the stage, resume in the stage at its step."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from bnfree_jax.distill.plan import FROZEN, SLOW, TRAINABLE, UNUSED, Stage
from bnfree_jax.distill.teacher_cache import CachedBatches, TeacherCache
from bnfree_jax.pipeline.phase_runner import train_phase
from bnfree_jax.train.optim import carry_moments, make_staged_optimizer
from bnfree_jax.train.state import create_train_state


@dataclasses.dataclass
class Trees:
    """The evolving parameters of a distillation: student S, working teacher copy T'."""

    S: dict
    T: dict
    Tbs: dict  # T' BN statistics (inference mode, never updated)
    teacher: dict  # the original QAT teacher's variables (targets only)


def split(stage: Stage, trees: Trees) -> tuple[dict, dict, dict]:
    """(trainable params, frozen tree, optimizer labels) for a stage."""
    params, frozen, labels = {"S": {}, "T": {}}, {"S": {}, "T": {}}, {"S": {}, "T": {}}
    for group, label in stage.labels.items():
        role, name = group.split(":")
        src = trees.S if role == "S" else trees.T
        if label in (TRAINABLE, SLOW):
            params[role][name] = src[name]
            labels[role][name] = jax.tree.map(lambda _: label, src[name])
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
    params, frozen, labels = split(stage, trees)
    tx = make_staged_optimizer(optim_cfg, max(stage.steps, 1), labels)
    return create_train_state(params, tx, rng=seed), frozen, tx


def run_stage(ctx, stage: Stage, trees: Trees, loss_fn, optim_cfg, ckpt_dir, *, seed: int,
              prev: Optional[Any] = None, cache: Optional[TeacherCache] = None) -> tuple[Trees, Any]:
    """Train one stage to its budget (resuming inside it if a checkpoint exists); with a
    teacher cache, its batches carry the teacher's logits and this stage's layer target."""
    state, frozen, tx = stage_state(stage, trees, optim_cfg, seed)
    if prev is not None:
        state = state.replace(opt_state=carry_moments(prev.opt_state, prev.params, state.opt_state, state.params))
    batches = ctx.train_batches(ctx.config.ptl.batch, seed_offset=seed)
    if cache is not None and stage.kind in ("tandem", "finetune"):
        batches = CachedBatches(batches, cache, layer=stage.layer)
    state = train_phase(ctx, stage.name, ckpt_dir, state, frozen, loss_fn, tx, batches, stage.steps)
    return merge_back(trees, state.params), state
