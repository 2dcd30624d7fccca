"""The job's report phase: measure the final student's layer statistics (the one step
that runs a network), then let report/ write summary.json, report.md and the plots
from the workdir's files."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.nn.network import TEACHER
from bnfree_jax.pipeline.jsonfile import write_json
from bnfree_jax.pipeline.layer_stats import job_layer_stats
from bnfree_jax.report.layer_stats import JSON_FILE, NPZ_FILE, save_layer_stats
from bnfree_jax.report.markdown import write_markdown
from bnfree_jax.report.summary import build_summary


def float_param_bytes(nets) -> int:
    """Bytes of the float teacher's parameters as float32 (the size the artifact replaces)."""
    net = nets.network(TEACHER, quantized=False)
    v = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, *nets.image_shape), jnp.uint8))
    return int(sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(v["params"])))


def write_report(ctx, ledger, wall_seconds: float, measure=job_layer_stats, extra: dict | None = None) -> dict:
    """report/ of the job: `measure(ctx)` gives the layer statistics (by default the final
    PTL student's against the QAT teacher), `extra` adds fields to the summary."""
    t0 = time.time()
    out = ctx.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        stats = measure(ctx)
    except Exception as e:  # a figure must never sink the report
        ctx.log(f"[report] layer statistics unavailable: {type(e).__name__}: {e}")
        stats = None
    if stats is not None:
        save_layer_stats(stats, out)
    else:  # no stale figures of an earlier student
        for name in (JSON_FILE, NPZ_FILE):
            (out / name).unlink(missing_ok=True)
    summary = build_summary(ctx.workdir, wall_seconds=wall_seconds, float_params_bytes=float_param_bytes(ctx.nets))
    summary.update(extra or {})
    write_markdown(ctx.workdir, summary, out, log=ctx.log)
    seconds = round(time.time() - t0, 2)
    summary["phase_seconds"]["report"] = seconds
    write_json(out / "summary.json", summary, indent=1)
    ledger.mark_done("report", seconds=seconds)
    return summary
