"""DIR/report/report.md: headline table, per-stage and per-layer tables, and the plots.

The report is written at the end of a long job, so a missing input (no sweep, no
artifact) or a failing plot costs that figure only: the rest of the report is written
and the figure's place says why it is absent.
"""

from __future__ import annotations

from typing import Callable, Optional

from bnfree_jax.report import plots
from bnfree_jax.report.layer_stats import load_layer_stats
from bnfree_jax.report.readers import (read_diagnostics, read_manifest, read_metrics, read_sweep,
                                      sweep_series)
from etils.epath import Path

NA = "n/a"

# (summary key, label, kind) in the order of the headline table.
HEADLINE = (
    ("teacher_top1", "teacher top-1 (float, BN)", "acc"),
    ("qat_teacher_top1", "QAT teacher top-1 (BN)", "acc"),
    ("student_fakequant_top1", "student top-1 (fake-quant)", "acc"),
    ("student_int_top1", "student top-1 (integer artifact)", "acc"),
    ("int_argmax_agreement", "integer vs fake-quant argmax agreement", "acc"),
    ("int_sim_bit_exact", "integer simulation bit-exact", "bool"),
    ("interpreter_float_ops", "float ops in the integer interpreter", "int"),
    ("bn_ops_in_artifact", "BN ops in the artifact", "int"),
    ("artifact_bytes", "artifact tensors (bytes)", "int"),
    ("float_params_bytes", "float32 parameters (bytes)", "int"),
    ("min_accumulator_headroom_bits", "min accumulator headroom (bits)", "int"),
    ("wall_seconds", "wall time (s)", "sec"),
)

CAPTIONS = {
    "scales": "Per-layer quantisation steps of the student. Look for smooth changes across layers; a per-channel "
              "spread of several decades means near-dead or dominant channels sharing a coarse grid.",
    "clipping_headroom": "Left: share of pre-activations cut off by the PACT clip — several percent means "
                         "act_alpha is too small, ~0 % with a large step wastes resolution. Right: bits the "
                         "int32 accumulator can still grow; any bar at or below 0 would risk overflow.",
    "histograms": "The student's distribution (line) should lie on the teacher's (shaded): a shift or width "
                  "mismatch marks a layer where the BN-free scale/bias did not absorb BatchNorm.",
    "layer_loss": "Local init shows every layer fitted alone; from the stage that converts it (ring) a layer's "
                  "loss should stay low — a rise in later stages means it is being pulled away from the teacher.",
    "training": "Loss should fall within each phase; the jump at the start of a tandem stage is the cost of "
                "converting one more layer and should be recovered within the stage.",
    "gradients": "Last logged value of each phase. Gradient norms per layer should stay within a few decades "
                 "of each other; a share clipped at α of several percent means the clip is too small; an STE "
                 "cosine near 1 means the quantizers' straight-through gradient points where the float "
                 "network's would, near 0 or below that it does not.",
    "accuracy_vs_bits": "PTL should match or beat the baselines at every bit width, most visibly at low bits; "
                        "error bars are ± one standard deviation over seeds.",
}

TITLES = {
    "scales": "Weight and activation scales",
    "clipping_headroom": "Clipping and accumulator headroom",
    "histograms": "Teacher vs student pre-activations",
    "layer_loss": "Layer-wise target loss across stages",
    "training": "Training curves",
    "gradients": "Gradient diagnostics per phase",
    "accuracy_vs_bits": "Accuracy vs bits",
}


def fmt_value(v, kind: str) -> str:
    """How a headline value appears in the table (n/a when the job did not produce it)."""
    if v is None or (kind == "int" and v < 0):  # the summary writes -1 for "not measured"
        return NA
    if kind == "acc":
        return f"{float(v):.4f}"
    if kind == "bool":
        return "yes" if v else "no"
    if kind == "sec":
        return f"{float(v):.1f}"
    return str(int(v))


def headline_rows(summary: dict) -> list:
    exported = summary.get("student_int_top1") is not None  # the summary writes False without an export
    rows = [(label, fmt_value(summary.get(key) if exported or key != "int_sim_bit_exact" else None, kind))
            for key, label, kind in HEADLINE]
    a, f = summary.get("artifact_bytes"), summary.get("float_params_bytes")
    rows.append(("float / artifact size ratio", f"{f / a:.1f}×" if a and f else NA))
    return rows


def md_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def stage_rows(summary: dict) -> list:
    out = []
    for s in summary.get("stages") or []:
        m = s.get("metrics") or {}
        t = m.get("tandem_top1")
        out.append((s.get("name"), plots.phase_kind(str(s.get("name"))), s.get("steps"),
                    f"{float(s['seconds']):.1f}" if s.get("seconds") is not None else NA,
                    f"{float(t):.4f}" if t is not None else NA))
    return out


def _num(v, f: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
    return NA if v is None else f"{v * scale:{f}}{suffix}"


def layer_rows(stats, manifest_layers: list) -> list:
    head = {l.get("name"): l.get("headroom_bits") for l in manifest_layers}
    rows = []
    for i, (s, ws, a, c) in enumerate(zip(stats.specs, stats.weight_scale, stats.act_scale, stats.clip_ratio)):
        w = NA if ws is None else (_num(float(ws[0])) if ws.size == 1 else
                                   f"{float(ws.min()):.3g} – {float(ws.max()):.3g}")
        hb = head.get(s.name, manifest_layers[i].get("headroom_bits") if i < len(manifest_layers) else None)
        rows.append((s.name, s.kind, s.w_bits, "logits" if s.last else s.a_bits, w, _num(a),
                     _num(c, ".2f", 100, " %"), NA if hb is None else hb))
    return rows


def precision_rows(summary: dict) -> list:
    """The resolved per-layer widths and quantizers (summary["layers"]), one row a layer."""
    return [(r.get("name"), r.get("w_bits"), "logits" if r.get("act_quantizer") is None else r.get("a_bits"),
             r.get("weight_quantizer"), r.get("act_quantizer") or NA) for r in summary.get("layers") or []]


def precision_section(summary: dict) -> list:
    """'## Precision per layer': the table, the rules that made it and the plug-ins (with
    their files' sha256), or nothing for a workdir pinned before the table was recorded."""
    rows = precision_rows(summary)
    if not rows:
        return []
    parts = ["## Precision per layer", "",
             md_table(["layer", "W bits", "A bits", "weight quantizer", "activation quantizer"], rows), ""]
    rules = summary.get("layer_rules") or []
    parts.append("Rules (`model.layers`, first match wins): " +
                 (", ".join(f"`{r[0]}` → {dict(r[1])}" for r in rules) if rules else "none (uniform widths)."))
    plugins = summary.get("plugins") or {}
    if plugins:
        parts.append("Plug-ins: " + ", ".join(f"`{n}` (sha256 {h[:12]}…)" for n, h in plugins.items()))
    return parts + [""]


def _try(name: str, fn: Callable[[], Optional[Path]], status: dict, log) -> None:
    try:
        path = fn()
        status[name] = path if path is not None else "no data for it in this job"
    except Exception as e:  # a figure must never sink the report
        status[name] = f"failed: {type(e).__name__}: {e}"
        log(f"[report] {name}.png: {status[name]}")


def make_plots(workdir: Path, summary: dict, out_dir: Path, log=print) -> tuple[dict, object, list]:
    """Draw every figure from the job's files; returns ({name: Path | why absent}, layer
    stats or None, manifest layers). A figure not drawn this time has its stale PNG from an
    earlier report removed."""
    workdir = Path(workdir)
    status: dict = {}
    per_channel = summary.get("requant") == "channel"
    manifest_layers = read_manifest(workdir).get("layers") or []
    stats = None
    try:
        stats = load_layer_stats(out_dir)
    except Exception as e:
        log(f"[report] layer statistics unreadable: {type(e).__name__}: {e}")
    no_student = "no final student in this job" if stats is None else None
    _try("scales", lambda: plots.plot_scales(stats, out_dir / "scales.png", per_channel), status, log)
    _try("clipping_headroom", lambda: plots.plot_clipping_headroom(stats, manifest_layers,
                                                                   out_dir / "clipping_headroom.png"), status, log)
    _try("histograms", lambda: plots.plot_histograms(stats, out_dir / "histograms.png"), status, log)
    _try("layer_loss", lambda: plots.plot_layer_loss(summary.get("stages") or [], out_dir / "layer_loss.png"),
         status, log)
    _try("training", lambda: plots.plot_training(read_metrics(workdir / "metrics.jsonl"),
                                                 out_dir / "training.png"), status, log)
    _try("accuracy_vs_bits", lambda: plots.plot_accuracy_vs_bits(sweep_series(read_sweep(workdir)),
                                                                 out_dir / "accuracy_vs_bits.png"), status, log)
    _try("gradients", lambda: plots.plot_gradients(read_diagnostics(workdir / "metrics.jsonl"),
                                                   out_dir / "gradients.png"), status, log)
    for k in ("scales", "histograms"):
        if no_student and not isinstance(status[k], Path):
            status[k] = no_student
    if "accuracy_vs_bits" in status and not isinstance(status["accuracy_vs_bits"], Path) \
            and not (workdir / "sweep" / "results.json").exists():
        status["accuracy_vs_bits"] = "no sweep was run (DIR/sweep/results.json absent)"
    for name, st in status.items():
        if not isinstance(st, Path):
            (out_dir / f"{name}.png").unlink(missing_ok=True)
    return status, stats, manifest_layers


def render(summary: dict, status: dict, stats=None, manifest_layers=()) -> str:
    """The markdown text (pure: the figures must already be in `status`)."""
    b = summary.get("bits") or {}
    bits = "mixed-precision" if summary.get("layer_rules") else f"W{b.get('w')}A{b.get('a')}"
    title = (f"# {summary.get('model')} on {summary.get('dataset')}: BN-free {bits} student"
             f" (requant = {summary.get('requant')})")
    parts = [title, "",
             f"First/last layer weights at {b.get('first_last_w')} bits. Written {summary.get('written_at', '')}.",
             "", "## Headline", "", md_table(["result", "value"], headline_rows(summary)), "",
             *precision_section(summary), "## PTL stages", ""]
    rows = stage_rows(summary)
    parts += [md_table(["stage", "kind", "steps", "seconds", "tandem top-1"], rows) if rows
              else "No distillation stage finished.", ""]
    if stats is not None:
        parts += ["## Layers", "",
                  md_table(["layer", "kind", "W bits", "A bits", "weight scale", "activation step",
                            "clipped", "headroom bits"], layer_rows(stats, list(manifest_layers))),
                  "", f"Clipping measured on {stats.n_probe} test images; n/a where the layer has no PACT "
                      "quantiser (logits, float or binary A=1 outputs).", ""]
    parts += ["## Figures", ""]
    for name, cap in CAPTIONS.items():
        st = status.get(name)
        parts.append(f"### {TITLES[name]}")
        parts.append("")
        if isinstance(st, Path):
            parts += [f"![{TITLES[name]}]({st.name})", "", cap]
        else:
            parts.append(f"*Not available: {st or 'not drawn'}.*")
        parts.append("")
    return "\n".join(parts)


def write_markdown(workdir, summary: dict, out_dir, log=print) -> Path:
    """Write out_dir/report.md and its PNGs from the job's files; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    status, stats, manifest_layers = make_plots(workdir, summary, out_dir, log)
    path = out_dir / "report.md"
    path.write_text(render(summary, status, stats, manifest_layers))
    return path
