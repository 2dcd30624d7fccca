"""Progressive tandem learning end to end: fold → local init → stages ℓ = 1..L → fine-tune.

Every finished stage is recorded (the job's ledger, passed in as `records`) with its
metrics, and its trees are saved in `out_dir/<stage>`, so a rerun skips it; an
unfinished stage resumes from its own checkpoints in `ckpt_dir/<stage>`.
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.distill.fold import fold_student
from bnfree_jax.distill.handover import hand_over_all, needs_handover
from bnfree_jax.distill.least_squares import least_squares_init
from bnfree_jax.distill.plan import FROZEN, UNUSED, Stage, allocate_by_residual, build_stage_plan
from bnfree_jax.distill.stage_runner import Trees, run_stage, stage_state
from bnfree_jax.distill.tandem import (layer_errors, make_finetune_loss, make_local_init_loss,
                                       make_tandem_loss, own_layer_error, tandem_roles, tandem_variables)
from bnfree_jax.distill.teacher_cache import TeacherCache, build_teacher_cache
from bnfree_jax.nn.network import STUDENT, TEACHER
from bnfree_jax.data.storage import Path, as_path
from bnfree_jax.train.checkpoint import Checkpointer
from bnfree_jax.train.clip_calibration import calibrated_clips, clips_text
from bnfree_jax.train.evaluate import evaluate_top1
from bnfree_jax.train.phase import resume
from bnfree_jax.train.streams import stream_key, stream_seed
from bnfree_jax.train.variables import load_variables, save_variables

PROBE_IMAGES = 256  # evaluation images for the per-layer error records


def stage_loss(env, stage: Stage, student_net, teacher_net):
    p = env.ptl
    if stage.kind == "local_init":
        return make_local_init_loss(student_net, teacher_net)
    if stage.kind == "finetune":
        return make_finetune_loss(student_net, teacher_net, stage.losses, p.kd_temperature)
    L, l, start = len(student_net.specs), stage.layer, stage.block_first
    prefix_frozen = all(stage.labels[f"S:{s.name}"] == FROZEN for s in student_net.specs[: start - 1])
    return make_tandem_loss(env.nets.network(tandem_roles(L, l)), env.nets.network(tandem_roles(L, start - 1)),
                            teacher_net, l, stage.losses, p.kd_temperature, prefix_frozen, target_mode(stage),
                            own_activation=stage.own_activation, first=start)


def target_mode(stage: Stage) -> str:
    """'tandem' when the plan gave stage ℓ the working copy T'_ℓ as its target, else 'teacher'."""
    return "teacher" if stage.labels.get(f"T:{stage.layer_name}", UNUSED) == UNUSED else "tandem"


def stage_metrics(env, stage: Stage, trees: Trees, teacher_net, probe) -> dict:
    """Tandem top-1 after the stage and the relative MSE of every converted layer."""
    L = len(env.nets.layer_names)
    l = stage.layer if stage.kind == "tandem" else L
    net = env.nets.network(tandem_roles(L, l))
    variables = tandem_variables(net.specs, l, trees.S, trees.T, trees.Tbs)
    errors = layer_errors(net, teacher_net, l, variables, trees.teacher, probe)
    apply_fn = lambda p, ms, fr, x: net.apply({"params": p, "batch_stats": ms}, x, train=False)
    top1 = evaluate_top1(apply_fn, variables["params"], variables["batch_stats"], {}, env.feed, env.rt.mesh)
    return {"tandem_top1": top1, "layer_mse": errors}


def _own_layer_error(env, stage: Stage, trees: Trees, teacher_net, probe) -> float:
    """Relative MSE of the stage's own layer to its stage target (what the stage minimises)."""
    L, l, start = len(env.nets.layer_names), stage.layer, stage.block_first
    return own_layer_error(env.nets.network(tandem_roles(L, l)), env.nets.network(tandem_roles(L, start - 1)),
                           teacher_net, l, trees, probe, target_mode(stage), start)


def plan_teacher_cache(env, teacher_vars) -> Optional[TeacherCache]:
    """The teacher cache of a plan; None when training inputs are augmented or
    `ptl.cache_teacher` is off."""
    p = env.ptl
    if not p.cache_teacher or env.feed.augment != "none":
        return None
    t0 = time.time()
    budget = p.target_cache_mb if p.layer_target == "teacher" else 0  # "tandem" targets come from T'
    cache = build_teacher_cache(env.nets.network(TEACHER), teacher_vars, env.feed.train_source,
                                budget_mb=budget, image_size=env.feed.image_size)
    names = env.nets.layer_names
    env.log(f"teacher cache: logits and targets of {', '.join(names[l - 1] for l in cache.targets) or 'no layer'} "
            f"for {len(cache.ids)} examples, {cache.nbytes / 2 ** 20:.0f} MiB in {time.time() - t0:.1f} s")
    return cache


def initial_trees(env, qat_vars, init: str) -> Trees:
    student_net = env.nets.network(STUDENT)
    if init == "fold":
        S = fold_student(student_net, qat_vars)
    elif init == "scratch":
        x = jnp.zeros((1, *env.nets.image_shape), jnp.uint8)
        S = jax.device_get(student_net.init(stream_key(env.seed, "student/init"), x)["params"])
        if env.nets.act_calibration:  # model.act_init=NAME: the clips by calibration of this init
            variables, record = calibrated_clips(student_net, {"params": S}, env.feed, env.nets.act_calibration,
                                                 stream_seed(env.seed, "student/act_init"))
            S = variables["params"]
            env.log(f"scratch student: activation clips by {env.nets.act_calibration} calibration: "
                    f"{clips_text(record['act_alpha'])}")
    else:
        raise ValueError(f"unknown student init {init!r}")
    return Trees(S=S, T=dict(qat_vars["params"]), Tbs=dict(qat_vars["batch_stats"]), teacher=qat_vars)


def _stage_fit(env, plan, k: int, student_net, teacher_net, probe) -> Callable:
    """The closed-form start of a fresh stage k: least squares (local init), the hand-over
    of T'_ℓ to S_ℓ (compensation on), and the own-layer error it starts from."""
    stage = plan[k]

    def fit(trees: Trees):
        record = {}
        batches = lambda: env.feed.train_batches(env.ptl.batch, stream_seed(env.seed, f"stage/{stage.name}/fit"),
                                                 env.rt.mesh)
        if stage.kind == "local_init":
            with closing(batches()) as ls_batches:
                S, ls_err = least_squares_init(student_net, trees.S, teacher_net, trees.teacher, ls_batches)
            trees = Trees(S=S, T=trees.T, Tbs=trees.Tbs, teacher=trees.teacher)
            record["least_squares_rel_residual"] = ls_err
        if needs_handover(plan, k):
            with closing(batches()) as ls_batches:
                trees, rel = hand_over_all(env.nets, stage, trees, refit=env.ptl.local_init, batches=ls_batches)
            if rel:  # {layer: relative residual}, one entry per layer the stage converts
                record["handover_rel_residual"] = rel
        if stage.kind == "tandem":
            record["layer_mse_start"] = _own_layer_error(env, stage, trees, teacher_net, probe)
        return trees, record

    return fit


def _optim(env, stage: Stage):
    return env.ptl.finetune_optim if stage.kind == "finetune" else env.ptl.optim


def run_plan(env, qat_vars, plan, *, records, out_dir: Path, ckpt_dir: Path, variant: str = "ptl",
             init: str = "fold", cache: Callable[[], Optional[TeacherCache]] = lambda: None) -> tuple[dict, list]:
    """Run a stage plan; returns (student params, per-stage records). `records` is the
    job's ledger (done/get/mark_done/clock), keyed `<variant>/<stage>`; `cache()` gives the
    teacher cache, asked for only when a stage still has to train."""
    student_net, teacher_net = env.nets.network(STUDENT), env.nets.network(TEACHER)
    trees = initial_trees(env, qat_vars, init)
    if env.ptl.stage_budget == "residual" and any(s.kind == "tandem" for s in plan):  # fold + QAT has none
        plan = _residual_plan(env, plan, trees, records, variant)
    probe = env.feed.eval_arrays(PROBE_IMAGES)[0]
    pending = any(s.steps and not records.done(f"{variant}/{s.name}") for s in plan)
    teacher_cache = cache() if pending else None  # a finished job needs none
    out, prev_state = [], None
    for k, stage in enumerate(plan):
        key = f"{variant}/{stage.name}"
        saved_dir = as_path(out_dir) / stage.name
        if records.done(key):
            saved = load_variables(saved_dir, {"S": trees.S, "T": trees.T})
            trees = Trees(S=saved["S"], T=saved["T"], Tbs=trees.Tbs, teacher=trees.teacher)
            out.append(records.get(key))
            prev_state = None
            continue
        if prev_state is None and k > 0 and plan[k - 1].steps > 0:
            prev_state = _final_state(env, plan[k - 1], trees, as_path(ckpt_dir) / plan[k - 1].name)
        with records.clock(key) as elapsed:
            trees, prev_state, extra = run_stage(
                env, stage, trees, stage_loss(env, stage, student_net, teacher_net), _optim(env, stage),
                as_path(ckpt_dir) / stage.name, prev=prev_state, cache=teacher_cache,
                fit=_stage_fit(env, plan, k, student_net, teacher_net, probe))
            metrics = stage_metrics(env, stage, trees, teacher_net, probe)
            if stage.kind == "tandem":
                extra["layer_mse_end"] = _own_layer_error(env, stage, trees, teacher_net, probe)
            rec = {"order": k, "variant": variant, "name": stage.name, "kind": stage.kind, "steps": stage.steps,
                   "seconds": elapsed(), "metrics": {**metrics, **extra}}
            save_variables(saved_dir, {"S": trees.S, "T": trees.T})
            records.mark_done(key, **rec)
        env.log(f"[{variant}] {stage.name}: tandem top-1 {metrics['tandem_top1']:.4f}")
        out.append(rec)
    return trees.S, out


def _residual_plan(env, plan, trees: Trees, records, variant: str) -> list[Stage]:
    """`plan` with its tandem budget shared by each layer's least-squares residual on the
    initial trees (`ptl.stage_budget="residual"`); the residuals are recorded
    (`<variant>/budget`), so a resumed job trains the same plan."""
    key = f"{variant}/budget"
    recorded = records.get(key) if records.done(key) else None
    if recorded:
        residuals = recorded["residuals"]
    else:
        with closing(env.feed.train_batches(env.ptl.batch, stream_seed(env.seed, key), env.rt.mesh)) as batches:
            _, residuals = least_squares_init(env.nets.network(STUDENT), trees.S, env.nets.network(TEACHER),
                                              trees.teacher, batches)
    plan = allocate_by_residual(plan, residuals)
    if not recorded:
        records.mark_done(key, residuals=residuals, steps={s.name: s.steps for s in plan})
    env.log(f"[{variant}] stage budget by residual: "
            + ", ".join(f"{s.name} {s.steps}" for s in plan if s.kind == "tandem"))
    return plan


def _final_state(env, stage: Stage, trees: Trees, stage_ckpt_dir: Path):
    """The finished previous stage's train state from its last checkpoint, so a resumed job
    carries the same optimizer moments into the next stage as an uninterrupted one."""
    like, _, _ = stage_state(stage, trees, _optim(env, stage), env.seed)
    ckpt = Checkpointer(stage_ckpt_dir, save_every=1, keep=1, log=env.log)
    try:
        found = resume(ckpt, like, env.rt, stage.name)
    finally:
        ckpt.close()
    return None if found is None else found[0]


def ptl_plan(env) -> list[Stage]:
    return build_stage_plan(env.ptl, env.nets.layer_names)


def final_student(nets, ptl_cfg, out_dir: Path) -> Optional[dict]:
    """The student after the last stage of the plan saved under `out_dir` (params only),
    or None when that stage has not finished."""
    last = build_stage_plan(ptl_cfg, nets.layer_names)[-1].name
    path = as_path(out_dir) / last
    if not path.exists():
        return None
    x = jnp.zeros((1, *nets.image_shape), jnp.uint8)
    shapes = lambda net: jax.eval_shape(net.init, jax.random.key(0), x)["params"]
    zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
    like = {"S": zeros(shapes(nets.network(STUDENT))), "T": zeros(shapes(nets.network(TEACHER)))}
    return load_variables(path, like)["S"]
