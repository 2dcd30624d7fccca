"""The subcommands' bodies: each opens the job (pinned config, context, ledger) and runs phases."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from bnfree_jax.config_io import ConfigError, load_config
from bnfree_jax.distributed import barrier
from bnfree_jax.pipeline.job import pin_config
from bnfree_jax.pipeline.phases import Ledger

console = Console(stderr=True)


def _log(msg: str) -> None:
    console.print(msg, highlight=False)


def open_job(config, workdir: Path, force: bool):
    from bnfree_jax.pipeline.context import make_context

    pin_config(config, workdir, force)
    ctx = make_context(config, workdir, log=_log)
    return ctx, Ledger(workdir)


def train_teacher(config, workdir: Path, args) -> int:
    from bnfree_jax.pipeline.teacher import run_teacher_phases

    ctx, ledger = open_job(config, workdir, args.force)
    run_teacher_phases(ctx, ledger, qat=args.qat)
    for phase in ("teacher", "qat"):
        if ledger.done(phase):
            print(f"{phase}_top1={ledger.get(phase)['top1']:.4f}")
    return 0


def distill(config, workdir: Path, args) -> int:
    from bnfree_jax.distill.plan import build_stage_plan, plan_table, total_steps

    if args.dry_run:
        from bnfree_jax.nn.zoo import get_layer_specs
        from bnfree_jax.pipeline.context import validate_config

        validate_config(config)
        m = config.model
        names = [s.name for s in get_layer_specs(m.name, m.num_classes)]
        plan = build_stage_plan(config.ptl, names)
        Console().print(plan_table(plan))
        print(f"total distillation steps: {total_steps(plan)}")
        return 0
    ctx, ledger = open_job(config, workdir, args.force)
    run_distill(ctx, ledger)
    return 0


def run_distill(ctx, ledger):
    from bnfree_jax.distill.ptl import run_ptl
    from bnfree_jax.pipeline.teacher import run_teacher_phases

    _, qat_vars = run_teacher_phases(ctx, ledger, qat=True)
    student, records = run_ptl(ctx, ledger, qat_vars)
    if not ledger.done("student"):
        from bnfree_jax.pipeline.evaluate import evaluate_top1

        net = ctx.network("student")
        top1 = evaluate_top1(ctx, lambda p, ms, fr, x: net.apply({"params": p}, x), student, {}, {})
        ledger.mark_done("student", top1=top1)
        ctx.log(f"[ptl] student (fake-quant) test top-1 {top1:.4f}")
    return student, records


def _job_config(workdir: Path):
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{workdir} holds no job (no config.json); run `bnfree distill` or `bnfree run` first")
    import ml_collections

    return ml_collections.ConfigDict(json.loads(path.read_text()))


def export(workdir: Path, onnx: bool = False) -> int:
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.pipeline.export_phase import export_student

    config = _job_config(workdir)
    ctx = make_context(config, workdir, log=_log)
    ledger = Ledger(workdir)
    if not ledger.done("student"):
        raise ConfigError(f"{workdir}: distillation has not finished; run `bnfree distill` first")
    manifest = export_student(ctx, ledger)
    out = {"artifact": str(Path(workdir) / "export"), **manifest.get("metrics", {})}
    if onnx:
        from bnfree_jax.export.onnx_export import artifact_to_onnx

        artifact_to_onnx(Path(workdir) / "export", Path(workdir) / "export" / "model.onnx")
        out["onnx"] = str(Path(workdir) / "export" / "model.onnx")
    print(json.dumps(out))
    return 0


def eval_int(args) -> int:
    from bnfree_jax.pipeline.verify import eval_int_command

    return eval_int_command(args)


def run(config, workdir: Path, args) -> int:
    from bnfree_jax.pipeline.export_phase import export_student
    from bnfree_jax.report.summary import write_report

    t0 = time.time()
    ctx, ledger = open_job(config, workdir, args.force)
    run_distill(ctx, ledger)
    from bnfree_jax.pipeline.context import is_primary

    if is_primary():  # export, verification and report are single-host work
        export_student(ctx, ledger)
        summary = write_report(ctx, ledger, wall_seconds=time.time() - t0)
        from bnfree_jax.report.table import print_summary

        print_summary(summary)
    barrier("bnfree_run_done")
    return 0


def sweep(config, workdir: Path, args) -> int:
    from bnfree_jax.pipeline.sweep import results_table, run_sweep

    if "sweep" not in config:
        raise ConfigError("this config has no `sweep` block; use configs/mnist_sweep.py")
    rows = run_sweep(config, workdir, log=_log)
    print(results_table(rows))
    return 0


__all__ = ["sweep", "train_teacher", "distill", "export", "eval_int", "run", "load_config"]
