"""The short table printed at the end of `bnfree run`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)


def print_summary(summary: dict) -> None:
    t = Table(title=f"{summary['model']} on {summary['dataset']}  W{summary['bits']['w']}A{summary['bits']['a']}"
                    f"  requant={summary.get('requant')}")
    t.add_column("result")
    t.add_column("value", justify="right")
    for key in ("teacher_top1", "qat_teacher_top1", "student_fakequant_top1", "student_int_top1",
                "int_argmax_agreement", "int_sim_bit_exact", "interpreter_float_ops", "bn_ops_in_artifact",
                "artifact_bytes", "float_params_bytes", "min_accumulator_headroom_bits", "wall_seconds"):
        t.add_row(key, _fmt(summary.get(key)))
    Console().print(t)
