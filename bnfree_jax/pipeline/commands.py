"""The subcommands' bodies: each opens the job (validated config, context, workdir lock,
pinned config, ledger) and runs its phases in data-flow order."""

from __future__ import annotations

import contextlib
import json
import time

from rich.console import Console

from bnfree_jax.config_io import ConfigError, with_added
from bnfree_jax.pipeline.context import is_primary, make_context
from bnfree_jax.pipeline.distill_phase import run_distill
from bnfree_jax.pipeline.eval_int import eval_int_command
from bnfree_jax.pipeline.export_phase import export_student
from bnfree_jax.pipeline.job import pin_config, read_pinned
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.lock import workdir_lock
from bnfree_jax.pipeline.report_phase import write_report
from bnfree_jax.pipeline.sweep import run_sweep
from bnfree_jax.pipeline.teacher import run_teacher_phases
from bnfree_jax.pipeline.validate import load_valid_config as load_config
from bnfree_jax.pipeline.validate import validate_config
from bnfree_jax.report.results_table import results_table
from bnfree_jax.data.storage import Path, as_path
from bnfree_jax.train.distributed import barrier
from bnfree_jax.train.telemetry import parse_profile_steps

console = Console(stderr=True)


def _log(msg: str) -> None:
    console.print(msg, highlight=False, markup=False, soft_wrap=True)  # one line per message, as written


@contextlib.contextmanager
def open_job(config, workdir: Path, force: bool, command: str, profile_steps: str | None = None,
             check=None):
    """(context, ledger) of a job. Everything that can refuse the job (config values, data,
    devices, the command's own `check(ctx)`, another run holding the workdir, a changed
    config) does so before anything is written; the workdir stays locked until the command
    ends."""
    validate_config(config)
    workdir = as_path(workdir)
    ctx = make_context(config, workdir, log=_log, profile_steps=parse_profile_steps(profile_steps))
    if check is not None:
        check(ctx)
    with workdir_lock(workdir, command, primary=is_primary(), log=_log):
        pin_config(config, workdir, force)
        yield ctx, Ledger(workdir)


def train_teacher(config, workdir: Path, args) -> int:
    with open_job(config, workdir, args.force, "bnfree train-teacher", args.profile_steps) as (ctx, ledger):
        run_teacher_phases(ctx, ledger, qat=args.qat)
        for phase in ("teacher", "qat"):
            if ledger.done(phase):
                print(f"{phase}_top1={ledger.get(phase)['top1']:.4f}")
    return 0


def distill(config, workdir: Path, args) -> int:
    from bnfree_jax.distill.plan import build_stage_plan, plan_table, total_steps
    from bnfree_jax.nn.zoo import get_layer_specs

    if args.dry_run:
        validate_config(config)
        m = config.model
        ptl = with_added(config, "ptl")
        plan = build_stage_plan(ptl, [s.name for s in get_layer_specs(m.name, m.num_classes)])
        Console().print(plan_table(plan))
        print(f"total distillation steps: {total_steps(plan)}")
        if ptl.stage_budget == "residual":
            print("ptl.stage_budget=residual: the tandem stages' steps above are shared by each layer's "
                  "residual when the job starts (same total)")
        return 0
    with open_job(config, workdir, args.force, "bnfree distill", args.profile_steps) as (ctx, ledger):
        run_distill(ctx, ledger)
    return 0


def job_config(workdir: Path):
    """The config a workdir's job was started with."""
    import ml_collections

    return ml_collections.ConfigDict(read_pinned(workdir))


def export(workdir: Path, onnx: bool = False) -> int:
    config = job_config(workdir)
    with open_job(config, workdir, False, "bnfree export") as (ctx, ledger):
        if not ledger.done("student"):
            raise ConfigError(f"{workdir}: distillation has not finished; run `bnfree distill` first")
        manifest = export_student(ctx, ledger)
    art = as_path(workdir) / "export"
    out = {"artifact": str(art), **manifest.get("metrics", {})}
    if onnx:
        from bnfree_jax.export.onnx_export import artifact_to_onnx

        artifact_to_onnx(art, art / "model.onnx")
        out["onnx"] = str(art / "model.onnx")
    print(json.dumps(out))
    return 0


def sensitivity(args) -> int:
    """Per-layer sensitivity of a finished job and, with a budget, a `model.layers` proposal."""
    from bnfree_jax.pipeline.sensitivity import run_sensitivity

    workdir = as_path(args.workdir)
    config = job_config(workdir)
    with open_job(config, workdir, False, "bnfree sensitivity") as (ctx, _):
        out = run_sensitivity(ctx, args.budget_bytes, args.examples, workdir / "sensitivity", log=_log)
    print(f"sensitivity of {len(out['layers'])} layers on {out['n_images']} {out['split']} images: "
          f"{workdir / 'sensitivity' / 'sensitivity.json'}")
    if "proposal" in out:
        p = out["proposal"]
        print(f"proposal: {p['bytes']} B of {p['budget_bytes']} B, summed loss increase {p['sum_delta_loss']:.4f}")
        print(f"model.layers=\"{p['rules']!r}\"")
    return 0


def eval_int(args) -> int:
    return eval_int_command(args)


def run(config, workdir: Path, args) -> int:
    t0 = time.time()
    with open_job(config, workdir, args.force, "bnfree run", args.profile_steps) as (ctx, ledger):
        run_distill(ctx, ledger)
        if is_primary():  # export, verification and report are single-host work
            export_student(ctx, ledger)
            summary = write_report(ctx, ledger, wall_seconds=time.time() - t0)
            from bnfree_jax.report.table import print_summary

            print_summary(summary)
        barrier("bnfree_run_done")
    return 0


def ptq(config, workdir: Path, args) -> int:
    from bnfree_jax.pipeline.ptq import check_calibration_images, options_from_args, run_ptq
    from bnfree_jax.report.table import print_summary

    t0 = time.time()
    opts = options_from_args(args)
    with open_job(config, workdir, False, "bnfree ptq", args.profile_steps,
                  check=lambda ctx: check_calibration_images(ctx, opts)) as (ctx, ledger):
        summary = run_ptq(ctx, ledger, opts, t0)
        barrier("bnfree_ptq_done")
    if summary is None:  # not process 0
        return 0
    print_summary(summary)
    print(json.dumps({"artifact": str(as_path(workdir) / "ptq" / opts.tag / "export"),
                      "teacher_top1": summary["teacher_top1"], "student_int_top1": summary["student_int_top1"],
                      "int_sim_bit_exact": summary["int_sim_bit_exact"],
                      "interpreter_float_ops": summary["interpreter_float_ops"], "calibration": opts.record()}))
    return 0


def ptq_sweep(config, workdir: Path, args) -> int:
    from bnfree_jax.pipeline.ptq_sweep import run_ptq_sweep, sweep_table

    if "ptq_sweep" not in config:
        raise ConfigError("this config has no `ptq_sweep` block; use configs/mnist_ptq_sweep.py")
    with workdir_lock(workdir, "bnfree ptq-sweep", primary=is_primary(), log=_log):
        rows = run_ptq_sweep(config, workdir, log=_log)
    print(sweep_table(rows))
    return 0


def sweep(config, workdir: Path, args) -> int:
    if "sweep" not in config:
        raise ConfigError("this config has no `sweep` block; use configs/mnist_sweep.py")
    validate_config(config)
    with workdir_lock(workdir, "bnfree sweep", primary=is_primary(), log=_log):
        rows = run_sweep(config, workdir, log=_log)
    print(results_table(rows))
    return 0


__all__ = ["ptq", "ptq_sweep", "sweep", "sensitivity", "train_teacher", "distill", "export", "eval_int", "run",
           "load_config"]
