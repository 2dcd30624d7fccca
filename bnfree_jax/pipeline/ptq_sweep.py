"""`bnfree ptq-sweep`: the calibration table, PTQ top-1 over calibrator × bits × calibration
images × requant × calibration samples, on ONE float teacher.

One pinned sub-job per (bits, requant) in DIR/<wXaY>_<requant> (the float teacher does
not depend on either: it is trained in the first and copied into the others); each row is
one `bnfree ptq` calibration in that sub-job's ptq/<tag>. Rows accumulate in
DIR/ptq_sweep/results.json (a rerun skips finished rows); DIR/ptq_sweep/table.md has the
mean ± std over the samples.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from bnfree_jax.data.storage import Path, as_path
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.pipeline.job import pin_config
from bnfree_jax.pipeline.jsonfile import read_json, write_json
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.ptq import PtqOptions, run_ptq
from bnfree_jax.pipeline.sweep import _share_teacher
from bnfree_jax.pipeline.validate import validate_config

KEY = ("method", "percentile", "w_bits", "a_bits", "requant", "images", "sample", "weight_calib")


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
            for opts in options:
                key = row_key(opts, c)
                if key in done:
                    continue
                t0 = time.time()
                s = run_ptq(ctx, ledger, opts, t0)
                first = first or sub
                rows.append({**dict(zip(KEY, key)), "top1": s["student_int_top1"],
                             "fakequant_top1": s["student_fakequant_top1"], "teacher_top1": s["teacher_top1"],
                             "bit_exact": s["int_sim_bit_exact"], "seconds": round(time.time() - t0, 1)})
                done.add(key)
                write_json(path, rows, indent=1)  # a crash mid-write must not lose the rows
            first = first or sub
    (out / "table.md").write_text(sweep_table(rows))
    return rows


def method_label(row: dict) -> str:
    return f"percentile {row['percentile']:g}" if row["method"] == "percentile" else row["method"]


def sweep_table(rows: list[dict]) -> str:
    """Markdown: integer top-1 (%) mean ± std over calibration samples, one line per
    (method, bits, requant), one column per number of calibration images."""
    images = sorted({r["images"] for r in rows})
    groups: dict = {}
    for r in rows:
        key = (method_label(r), f"W{r['w_bits']}A{r['a_bits']}", r["requant"])
        groups.setdefault(key, {}).setdefault(r["images"], []).append(100 * r["top1"])
    lines = ["| method | bits | requant | " + " | ".join(f"N={n}" for n in images) + " |",
             "|---|---|---|" + "---:|" * len(images)]
    for (m, b, rq), by_n in groups.items():
        cells = [f"{np.mean(v):.2f} ± {np.std(v):.2f} ({len(v)})" if (v := by_n.get(n)) else "n/a"
                 for n in images]
        lines.append(f"| {m} | {b} | {rq} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
