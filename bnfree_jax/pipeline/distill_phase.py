"""The job's distillation phases: teachers if needed, the PTL plan, the student's
fake-quant top-1; and the baselines of a sweep, sharing the job's teacher cache."""

from __future__ import annotations

from bnfree_jax.distill.baselines import run_baseline
from bnfree_jax.distill.ptl import plan_teacher_cache, ptl_plan, run_plan
from bnfree_jax.nn.network import STUDENT
from bnfree_jax.pipeline.teacher import run_teacher_phases
from bnfree_jax.train.evaluate import evaluate_top1


def teacher_cache(ctx, qat_vars):
    """A function giving the job's teacher cache, built on first use and shared by PTL and
    the baselines of one job."""
    def get():
        if "teacher_cache" not in ctx.memo:
            ctx.memo["teacher_cache"] = plan_teacher_cache(ctx.env, qat_vars)
        return ctx.memo["teacher_cache"]
    return get


def run_distill(ctx, ledger):
    """Teachers, then PTL; returns (student params, per-stage records)."""
    _, qat_vars = run_teacher_phases(ctx, ledger, qat=True)
    with ledger.clock("student") as elapsed:
        student, records = run_plan(ctx.env, qat_vars, ptl_plan(ctx.env), records=ledger,
                                    out_dir=ctx.workdir / "ptl", ckpt_dir=ctx.workdir / "checkpoints" / "ptl",
                                    cache=teacher_cache(ctx, qat_vars))
        if not ledger.done("student"):
            net = ctx.nets.network(STUDENT)
            top1 = evaluate_top1(lambda p, ms, fr, x: net.apply({"params": p}, x), student, {}, {}, ctx.feed,
                                 ctx.rt.mesh)
            ledger.mark_done("student", top1=top1, seconds=elapsed())
            ctx.log(f"[ptl] student (fake-quant) {ctx.eval_split} top-1 {top1:.4f}")
    return student, records


def baseline_student(ctx, ledger, qat_vars, name: str):
    """A baseline's student params (trained, or just folded), its stages in the ledger."""
    return run_baseline(ctx.env, qat_vars, name, records=ledger, out_dir=ctx.workdir / "baselines" / name,
                        ckpt_dir=ctx.workdir / "checkpoints" / "baselines" / name,
                        cache=teacher_cache(ctx, qat_vars))
