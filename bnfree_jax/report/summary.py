"""DIR/report/summary.json and report.md: the job's results in one place, from the ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def _float_param_bytes(ctx) -> int:
    import jax
    import jax.numpy as jnp

    net = ctx.network("teacher", quantized=False)
    v = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, *ctx.info.image_shape), jnp.uint8))
    return int(sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(v["params"])))


def build_summary(ctx, ledger, wall_seconds: float) -> dict:
    c = ctx.config
    ex = ledger.get("export") or {}
    stages = [{"name": r["name"], "steps": r["steps"], "seconds": r["seconds"], "metrics": r["metrics"]}
              for k, r in sorted(ledger.data.items(), key=lambda kv: kv[1].get("order", 0))
              if k.startswith("ptl/")]
    tensors = ctx.workdir / "export" / "model.safetensors"
    return {
        "dataset": c.data.name, "model": c.model.name, "requant": c.model.requant,
        "eval_split": ctx.eval_split,
        "bits": {"w": c.model.w_bits, "a": c.model.a_bits, "first_last_w": c.model.first_last_w_bits},
        "teacher_top1": (ledger.get("teacher") or {}).get("top1"),
        "qat_teacher_top1": (ledger.get("qat") or {}).get("top1"),
        "student_fakequant_top1": ex.get("student_fakequant_top1"),
        "student_int_top1": ex.get("student_int_top1"),
        "int_argmax_agreement": ex.get("int_argmax_agreement"),
        "int_sim_bit_exact": bool(ex.get("int_sim_bit_exact", False)),
        "interpreter_float_ops": int(ex.get("interpreter_float_ops", -1)),
        "bn_ops_in_artifact": int(ex.get("bn_ops_in_artifact", -1)),
        "artifact_bytes": tensors.stat().st_size if tensors.exists() else None,
        "float_params_bytes": _float_param_bytes(ctx),
        "min_accumulator_headroom_bits": ex.get("min_accumulator_headroom_bits"),
        "wall_seconds": round(float(wall_seconds), 1),
        "stages": stages,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_report(ctx, ledger, wall_seconds: float) -> dict:
    out = ctx.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(ctx, ledger, wall_seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    from bnfree_jax.report.markdown import write_markdown

    write_markdown(ctx, summary, out)
    return summary
