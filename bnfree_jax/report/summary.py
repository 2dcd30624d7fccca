"""DIR/report/summary.json: the job's results in one place, read from its files (the
pinned config.json, the ledger phases.json, the artifact) — the report runs nothing."""

from __future__ import annotations

import json
import time

from etils.epath import Path

# Ledger entries that are whole phases of a job, in the order they run.
PHASES = ("teacher", "qat", "student", "export", "report")


def eval_split(config: dict) -> str:
    """What every evaluation of the job read: the test split, or the held-out tail of train."""
    n = (config.get("data") or {}).get("holdout", 0)
    return f"train[-{n}:]" if n else "test"


def ptl_stages(ledger: dict) -> list[dict]:
    """The PTL stage records of a ledger, in plan order (not `ptl/budget`, the residuals
    of `ptl.stage_budget="residual"`, which is no stage)."""
    return sorted((r for k, r in ledger.items() if k.startswith("ptl/") and "kind" in r),
                  key=lambda r: r.get("order", 0))


def phase_seconds(ledger: dict) -> dict:
    """Wall seconds of every finished phase and PTL stage (of the run that finished it)."""
    out = {k: ledger[k].get("seconds") for k in PHASES if k in ledger}
    out.update({f"ptl/{r['name']}": r.get("seconds") for r in ptl_stages(ledger)})
    return out


def build_summary(workdir, *, wall_seconds: float, float_params_bytes: int) -> dict:
    workdir = Path(workdir)
    c = json.loads((workdir / "config.json").read_text())
    ledger = json.loads((workdir / "phases.json").read_text()) if (workdir / "phases.json").exists() else {}
    m = c["model"]
    ex = ledger.get("export") or {}
    stages = [{"name": r["name"], "steps": r["steps"], "seconds": r["seconds"], "metrics": r["metrics"]}
              for r in ptl_stages(ledger)]
    tensors = workdir / "export" / "model.safetensors"
    return {
        "dataset": c["data"]["name"], "model": m["name"], "requant": m["requant"],
        "eval_split": eval_split(c),
        "bits": {"w": m["w_bits"], "a": m["a_bits"], "first_last_w": m["first_last_w_bits"]},
        "layer_rules": m.get("layers") or [],
        "layers": m.get("layer_table"),  # the resolved per-layer table; None in a workdir pinned before it
        "plugins": dict(zip(m.get("plugins") or [], m.get("plugin_sha256") or [])),
        "teacher_top1": (ledger.get("teacher") or {}).get("top1"),
        "qat_teacher_top1": (ledger.get("qat") or {}).get("top1"),
        "student_fakequant_top1": ex.get("student_fakequant_top1"),
        "student_int_top1": ex.get("student_int_top1"),
        "int_argmax_agreement": ex.get("int_argmax_agreement"),
        "int_sim_bit_exact": bool(ex.get("int_sim_bit_exact", False)),
        "interpreter_float_ops": int(ex.get("interpreter_float_ops", -1)),
        "bn_ops_in_artifact": int(ex.get("bn_ops_in_artifact", -1)),
        "artifact_bytes": tensors.stat().length if tensors.exists() else None,
        "float_params_bytes": int(float_params_bytes),
        "min_accumulator_headroom_bits": ex.get("min_accumulator_headroom_bits"),
        "wall_seconds": round(float(wall_seconds), 1),
        "phase_seconds": phase_seconds(ledger),
        "stages": stages,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
