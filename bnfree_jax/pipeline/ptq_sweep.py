"""`bnfree ptq-sweep`: the calibration table, PTQ top-1 over calibrator × bits × calibration
images × requant × calibration samples, on ONE float teacher.

One pinned sub-job per (bits, requant) in DIR/<wXaY>_<requant> (the float teacher does
not depend on either: it is trained in the first and copied into the others); each row is
one calibration in that sub-job's ptq/<tag>. Rows accumulate in
DIR/ptq_sweep/results.json (a rerun skips finished rows); DIR/ptq_sweep/table.md has the
mean ± std over the samples.

`ptq_sweep.verify`: "all" runs every row as `bnfree ptq` does (export verification and
report, ~25-50 s a row here); "first" (the default) runs the first row of each sub-job so,
and measures the others by `measured_row` (calibration, integerisation, the artifact
written and read back by the interpreter over the whole evaluation split, the export's own
integer simulation compared bit for bit on its first CHECK_IMAGES), ~4x faster: the table's
432 rows fit in about an hour and a half here instead of six.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from bnfree_jax.data.storage import Path, as_path
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.pipeline.export_phase import integer_layers
from bnfree_jax.pipeline.job import pin_config
from bnfree_jax.pipeline.jsonfile import read_json, write_json
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.config_io import to_dict
from bnfree_jax.export.artifact import write_artifact
from bnfree_jax.export.simulate import int_sim_batched
from bnfree_jax.pipeline.ptq import PtqOptions, calibration_context, ptq_student, run_ptq
from bnfree_jax.pipeline.teacher import run_teacher_phases
from bnfree_jax.pipeline.sweep import _share_teacher
from bnfree_jax.pipeline.validate import validate_config
from bnfree_jax.report.plots import plot_calibration
from bnfree_jax.report.results_table import mean_std

KEY = ("method", "percentile", "w_bits", "a_bits", "requant", "images", "sample", "weight_calib")
CHECK_IMAGES = 1000  # evaluation images a measured row's two integer paths are compared on


def calibrations(grid) -> list[PtqOptions]:
    """Every calibration of the grid, checked before any runs (percentile once per value)."""
    out = []
    for images in grid.images:
        for sample in grid.samples:
            for method in grid.methods:
                pcts = grid.percentiles if method == "percentile" else [PtqOptions.percentile]
                out += [PtqOptions(method=method, images=int(images), weight_calib=grid.weight_calib,
                                   percentile=float(p), seed=int(sample)).check() for p in pcts]
    return out


def sub_config(config, bits: str, requant: str):
    """The (bits, requant) sub-job's config: the sweep's, without its `ptq_sweep` block."""
    c = copy.deepcopy(config)
    w, a = bits[1:].split("a")
    c.model.w_bits, c.model.a_bits, c.model.requant = int(w), int(a), requant
    del c["ptq_sweep"]
    return c


def row_key(opts: PtqOptions, c) -> tuple:
    pct = opts.percentile if opts.method == "percentile" else None
    return (opts.method, pct, c.model.w_bits, c.model.a_bits, c.model.requant, opts.images, opts.seed,
            opts.weight_calib)


def run_ptq_sweep(config, workdir: Path, log=print) -> list[dict]:
    grid = config.ptq_sweep
    options = calibrations(grid)
    out = as_path(workdir) / "ptq_sweep"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    rows = read_json(path, "it holds the finished rows of this sweep: restore it or delete it", list) \
        if path.exists() else []
    done = {tuple(r[k] for k in KEY) for r in rows}
    first = None
    for bits in grid.bits:
        for requant in grid.requant:
            c = sub_config(config, bits, requant)
            validate_config(c)
            sub = as_path(workdir) / f"{bits}_{requant}"
            ctx = make_context(c, sub, log=log)
            pin_config(c, sub)
            if first is not None:
                _share_teacher(first, sub)
            ledger = Ledger(sub)
            float_vars = None
            for opts in options:
                key = row_key(opts, c)
                if key in done:
                    continue
                t0 = time.time()
                verified = grid.get("verify", "first") == "all" or not has_verified_row(rows, c)
                if verified:
                    s = run_ptq(ctx, ledger, opts, t0)
                    row = {"top1": s["student_int_top1"], "fakequant_top1": s["student_fakequant_top1"],
                           "teacher_top1": s["teacher_top1"], "bit_exact": s["int_sim_bit_exact"]}
                else:
                    float_vars = float_vars or run_teacher_phases(ctx, ledger, qat=False)[0]
                    row = measured_row(ctx, ledger, float_vars, opts)
                first = first or sub
                rows.append({**dict(zip(KEY, key)), **row, "verified": verified,
                             "seconds": round(time.time() - t0, 1)})
                log(f"[ptq-sweep] {bits} {requant} {opts.tag}: int top-1 {row['top1']:.4f} "
                    f"({len(rows)} rows, {time.time() - t0:.0f} s)")
                done.add(key)
                write_json(path, rows, indent=1)  # a crash mid-write must not lose the rows
            first = first or sub
    (out / "table.md").write_text(sweep_table(rows))
    plot_calibration(*calibration_curves(rows), out / "calibration.png")
    return rows


def has_verified_row(rows: list[dict], c) -> bool:
    """Whether the (bits, requant) sub-job of config `c` has a row run as `bnfree ptq`
    (rows from before `verified` existed all were)."""
    sub = (c.model.w_bits, c.model.a_bits, c.model.requant)
    return any(r.get("verified", True) and (r["w_bits"], r["a_bits"], r["requant"]) == sub for r in rows)


def measured_row(ctx, ledger, float_vars: dict, opts: PtqOptions) -> dict:
    """A calibration's integer top-1 without the full verification of `bnfree ptq`: the
    artifact written to ptq/<tag>/export and evaluated by the interpreter on the whole
    evaluation split; `bit_exact`: the export's own simulation gives the same int32 logits
    on the first CHECK_IMAGES."""
    from bnfree_jax import intsim

    sub = calibration_context(ctx, opts)
    params, calibration = ptq_student(sub, float_vars, opts)
    layers, input_spec = integer_layers(sub, params)
    out = sub.workdir / "export"
    write_artifact(out, layers=layers, input_spec=input_spec, config=to_dict(sub.config),
                   metrics={"calibration": calibration})
    images, labels = sub.feed.eval_arrays()
    logits = np.asarray(intsim.run_int(intsim.load_artifact(out), images, batch_size=1000))
    check = images[:CHECK_IMAGES]
    return {"top1": float(np.mean(logits.argmax(-1) == labels)), "fakequant_top1": None,
            "teacher_top1": ledger.get("teacher")["top1"],
            "bit_exact": bool(np.array_equal(int_sim_batched(layers, input_spec, check), logits[:len(check)]))}


def calibration_curves(rows: list[dict]) -> tuple[dict, dict]:
    """The plot's data: {(bits, requant): {method: [(images, mean, std, n)]}} over the
    calibration samples, and each panel's float teacher top-1 as its reference line."""
    groups: dict = {}
    refs: dict = {}
    for r in rows:
        panel = (f"w{r['w_bits']}a{r['a_bits']}", r["requant"])
        groups.setdefault(panel, {}).setdefault(method_label(r), {}).setdefault(r["images"], []).append(r["top1"])
        refs.setdefault(panel, {})["float teacher"] = r["teacher_top1"]
    curves = {panel: {m: [(n, *mean_std(v), len(v)) for n, v in by_n.items()]
                      for m, by_n in methods.items()} for panel, methods in groups.items()}
    return curves, refs


def method_label(row: dict) -> str:
    """The activation calibrator, and the weight calibration when it is not max-abs."""
    label = f"percentile {row['percentile']:g}" if row["method"] == "percentile" else row["method"]
    return label if row.get("weight_calib", "minmax") == "minmax" else f"{label}, weights {row['weight_calib']}"


def sweep_table(rows: list[dict], students: dict | None = None) -> str:
    """Markdown: integer top-1 (%) mean ± sample std over calibration samples, one line per
    (method, bits, requant), one column per number of calibration images; with
    `students` {(wXaY, requant): top-1}, a last column with the trained student's figure."""
    images = sorted({r["images"] for r in rows})
    students = students or {}
    groups: dict = {}
    for r in rows:
        key = (method_label(r), f"W{r['w_bits']}A{r['a_bits']}", r["requant"])
        groups.setdefault(key, {}).setdefault(r["images"], []).append(100 * r["top1"])
    extra = " PTL student |" if students else ""
    lines = ["| method | bits | requant | " + " | ".join(f"N={n}" for n in images) + " |" + extra,
             "|---|---|---|" + "---:|" * (len(images) + bool(students))]
    for (m, b, rq), by_n in groups.items():
        cells = ["{:.2f} ± {:.2f} ({})".format(*mean_std(v), len(v)) if (v := by_n.get(n)) else "n/a"
                 for n in images]
        if students:
            top1 = students.get((b.lower(), rq))
            cells.append(f"{100 * top1:.2f}" if top1 is not None else "n/a")
        lines.append(f"| {m} | {b} | {rq} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
