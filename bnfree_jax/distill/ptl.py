"""Progressive tandem learning end to end: fold → local init → stages ℓ = 1..L → fine-tune.

Every finished stage is recorded in the job's ledger with its metrics, and its trees are
saved, so a rerun skips it; an unfinished stage resumes from its own checkpoints.
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.distill.fold import fold_student
from bnfree_jax.distill.least_squares import least_squares_init
from bnfree_jax.distill.handover import hand_over_all, needs_handover
from bnfree_jax.distill.plan import FROZEN, UNUSED, Stage, build_stage_plan
from bnfree_jax.distill.stage_runner import Trees, run_stage, stage_state
from bnfree_jax.distill.teacher_cache import TeacherCache, build_teacher_cache
from bnfree_jax.distill.tandem import (layer_errors, make_finetune_loss, make_local_init_loss,
                                       make_tandem_loss, own_layer_error, tandem_roles, tandem_variables)
from bnfree_jax.nn.network import STUDENT, TEACHER
from bnfree_jax.pipeline.evaluate import evaluate_top1
from bnfree_jax.pipeline.variables import load_variables, save_variables


def _probe_images(ctx, n: int = 256) -> jnp.ndarray:
    """A fixed batch of test images for per-layer error reports."""
    src = ctx.test_source
    return jnp.asarray(np.stack([src[i]["image"] for i in range(min(n, len(src)))]))


def stage_loss(ctx, stage: Stage, student_net, teacher_net):
    p = ctx.config.ptl
    if stage.kind == "local_init":
        return make_local_init_loss(student_net, teacher_net)
    if stage.kind == "finetune":
        return make_finetune_loss(student_net, teacher_net, stage.losses, p.kd_temperature)
    L, l = len(student_net.specs), stage.layer
    prefix_frozen = all(stage.labels[f"S:{s.name}"] == FROZEN for s in student_net.specs[: l - 1])
    return make_tandem_loss(ctx.network(tandem_roles(L, l)), ctx.network(tandem_roles(L, l - 1)), teacher_net,
                            l, stage.losses, p.kd_temperature, prefix_frozen, target_mode(stage))


def target_mode(stage: Stage) -> str:
    """'tandem' when the plan gave stage ℓ the working copy T'_ℓ as its target, else 'teacher'."""
    return "teacher" if stage.labels.get(f"T:{stage.layer_name}", UNUSED) == UNUSED else "tandem"


def stage_metrics(ctx, stage: Stage, trees: Trees, student_net, teacher_net, probe) -> dict:
    """Tandem top-1 after the stage and the relative MSE of every converted layer."""
    L = len(student_net.specs)
    l = stage.layer if stage.kind == "tandem" else L
    net = ctx.network(tandem_roles(L, l))
    variables = tandem_variables(net.specs, l, trees.S, trees.T, trees.Tbs)
    errors = layer_errors(net, teacher_net, l, variables, trees.teacher, probe)
    apply_fn = lambda p, ms, fr, x: net.apply({"params": p, "batch_stats": ms}, x, train=False)
    top1 = evaluate_top1(ctx, apply_fn, variables["params"], variables["batch_stats"], {})
    return {"tandem_top1": top1, "layer_mse": errors}


def _own_layer_error(ctx, stage: Stage, trees: Trees, teacher_net, probe) -> float:
    """Relative MSE of the stage's own layer to its stage target (what the stage minimises)."""
    L, l = len(teacher_net.specs), stage.layer
    return own_layer_error(ctx.network(tandem_roles(L, l)), ctx.network(tandem_roles(L, l - 1)), teacher_net,
                           l, trees, probe, target_mode(stage))


def job_teacher_cache(ctx, teacher_vars) -> Optional[TeacherCache]:
    """The job's teacher cache, built on first use and shared by PTL and the baselines;
    None when training inputs are augmented or `ptl.cache_teacher` is off."""
    p = ctx.config.ptl
    if not p.cache_teacher or ctx.config.data.augment != "none":
        return None
    if "teacher_cache" not in ctx.memo:
        t0 = time.time()
        budget = p.target_cache_mb if p.layer_target == "teacher" else 0  # "tandem" targets come from T'
        cache = build_teacher_cache(ctx.network(TEACHER), teacher_vars, ctx.train_source,
                                    budget_mb=budget, image_size=ctx.config.data.image_size or None)
        names = [s.name for s in ctx.specs(quantized=True)]
        ctx.log(f"teacher cache: logits and targets of {', '.join(names[l - 1] for l in cache.targets) or 'no layer'} "
                f"for {len(cache.ids)} examples, {cache.nbytes / 2 ** 20:.0f} MiB in {time.time() - t0:.1f} s")
        ctx.memo["teacher_cache"] = cache
    return ctx.memo["teacher_cache"]


def initial_trees(ctx, qat_vars, student_net, init: str, seed: int) -> Trees:
    if init == "fold":
        S = fold_student(student_net, qat_vars)
    elif init == "scratch":
        S = jax.device_get(student_net.init(jax.random.PRNGKey(seed), jnp.zeros((1, *ctx.info.image_shape), jnp.uint8))["params"])
    else:
        raise ValueError(f"unknown student init {init!r}")
    return Trees(S=S, T=dict(qat_vars["params"]), Tbs=dict(qat_vars["batch_stats"]), teacher=qat_vars)


def run_plan(ctx, ledger, qat_vars, plan, variant: str = "ptl", init: str = "fold") -> tuple[dict, list]:
    """Run a stage plan; returns (student params, per-stage records)."""
    c = ctx.config
    student_net = ctx.network(STUDENT)
    teacher_net = ctx.network(TEACHER)
    trees = initial_trees(ctx, qat_vars, student_net, init, c.seed)
    probe = _probe_images(ctx)
    pending = any(s.steps and not ledger.done(f"{variant}/{s.name}") for s in plan)
    cache = job_teacher_cache(ctx, qat_vars) if pending else None  # a finished job needs none
    records, prev_state = [], None
    for k, stage in enumerate(plan):
        key = f"{variant}/{stage.name}"
        out = ctx.workdir / variant / stage.name
        if ledger.done(key):
            saved = load_variables(out, {"S": trees.S, "T": trees.T})
            trees = Trees(S=saved["S"], T=saved["T"], Tbs=trees.Tbs, teacher=trees.teacher)
            records.append(ledger.get(key))
            prev_state = None
            continue
        if prev_state is None and k > 0 and plan[k - 1].steps > 0:
            prev_state = _final_state(ctx, plan[k - 1], k - 1, trees, variant)
        t0 = time.time()
        extra = {}
        ckpt_dir = ctx.workdir / "checkpoints" / variant / stage.name
        fresh = not ckpt_dir.exists()  # a resumed stage restores what these fits would set
        if stage.kind == "local_init" and fresh:
            with closing(ctx.train_batches(c.ptl.batch, seed_offset=100 + k)) as ls_batches:
                S, ls_err = least_squares_init(student_net, trees.S, teacher_net, trees.teacher, ls_batches)
            trees = Trees(S=S, T=trees.T, Tbs=trees.Tbs, teacher=trees.teacher)
            extra["least_squares_rel_residual"] = ls_err
        if needs_handover(plan, k) and fresh:
            with closing(ctx.train_batches(c.ptl.batch, seed_offset=200 + k)) as ls_batches:
                trees, rel = hand_over_all(ctx, stage, trees, refit=c.ptl.local_init, batches=ls_batches)
            if rel:  # {layer: relative residual}, one entry per layer the stage converts
                extra["handover_rel_residual"] = rel
        if stage.kind == "tandem":
            extra["layer_mse_start"] = _own_layer_error(ctx, stage, trees, teacher_net, probe)
        optim = c.ptl.finetune_optim if stage.kind == "finetune" else c.ptl.optim
        trees, prev_state = run_stage(ctx, stage, trees, stage_loss(ctx, stage, student_net, teacher_net),
                                      optim, ckpt_dir, seed=c.seed + 1000 + k, prev=prev_state, cache=cache)
        metrics = stage_metrics(ctx, stage, trees, student_net, teacher_net, probe)
        if stage.kind == "tandem":
            extra["layer_mse_end"] = _own_layer_error(ctx, stage, trees, teacher_net, probe)
        rec = {"order": k, "variant": variant, "name": stage.name, "kind": stage.kind, "steps": stage.steps,
               "seconds": round(time.time() - t0, 2), "metrics": {**metrics, **extra}}
        save_variables(out, {"S": trees.S, "T": trees.T})
        ledger.mark_done(key, **rec)
        ctx.log(f"[{variant}] {stage.name}: tandem top-1 {metrics['tandem_top1']:.4f}")
        records.append(rec)
    return trees.S, records


def _final_state(ctx, stage: Stage, k: int, trees: Trees, variant: str):
    """The finished previous stage's train state from its last checkpoint, so a resumed job
    carries the same optimizer moments into the next stage as an uninterrupted one."""
    from bnfree_jax.train.checkpoint import Checkpointer, abstract_like

    c = ctx.config
    optim = c.ptl.finetune_optim if stage.kind == "finetune" else c.ptl.optim
    state, _, _ = stage_state(stage, trees, optim, c.seed + 1000 + k)
    ckpt = Checkpointer(ctx.workdir / "checkpoints" / variant / stage.name, save_every=1, keep=1, log=ctx.log)
    restored = ckpt.restore_latest(abstract_like(state, ctx.mesh))
    ckpt.close()
    return None if restored is None else restored[0]


def run_ptl(ctx, ledger, qat_vars) -> tuple[dict, list]:
    names = [s.name for s in ctx.specs(quantized=True)]
    return run_plan(ctx, ledger, qat_vars, build_stage_plan(ctx.config.ptl, names), "ptl")
