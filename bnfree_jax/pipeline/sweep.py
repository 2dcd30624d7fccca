"""`bnfree sweep`: PTL and every baseline over bit widths × requant settings × seeds.

One sub-job per (bits, requant, seed) in DIR/<wXaY>_<requant>_s<seed>, each an ordinary
resumable job; the float teacher of a seed is trained once and shared. Rows accumulate in
DIR/sweep/results.json (a rerun skips finished rows); DIR/sweep/table.md is the table.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bnfree_jax.pipeline.job import pin_config
from bnfree_jax.pipeline.phases import Ledger


def _sub_config(config, bits: str, requant: str, seed: int):
    c = copy.deepcopy(config)
    w, a = bits[1:].split("a")
    c.model.w_bits, c.model.a_bits, c.model.requant, c.seed = int(w), int(a), requant, seed
    if c.model.w_bits == 1 or c.model.a_bits == 1:
        c.qat.steps = max(c.qat.steps, c.sweep.binary_qat_steps)
        c.qat.optim.lr = c.sweep.binary_qat_lr
    del c["sweep"]
    return c


def _share_teacher(src: Path, dst: Path) -> None:
    """Copy a finished float teacher into a sub-job (same seed, same float network)."""
    if (dst / "teacher" / "variables").exists():
        return
    shutil.copytree(src / "teacher" / "variables", dst / "teacher" / "variables")
    Ledger(dst).mark_done("teacher", **{k: v for k, v in Ledger(src).get("teacher").items() if k != "done"})


def run_sweep(config, workdir: Path, log=print) -> list[dict]:
    from bnfree_jax.distill.baselines import run_baseline
    from bnfree_jax.pipeline.commands import run_distill
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.pipeline.export_phase import export_student
    from bnfree_jax.pipeline.teacher import run_teacher_phases

    out = Path(workdir) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["method"], r["w_bits"], r["a_bits"], r["requant"], r["seed"]) for r in rows}
    first = {}
    for seed in config.sweep.seeds:
        for bits in config.sweep.bits:
            for requant in config.sweep.requant:
                c = _sub_config(config, bits, requant, seed)
                sub = Path(workdir) / f"{bits}_{requant}_s{seed}"
                pin_config(c, sub)
                if seed in first:
                    _share_teacher(first[seed], sub)
                ctx = make_context(c, sub, log=log)
                ledger = Ledger(sub)
                key = lambda m: (m, c.model.w_bits, c.model.a_bits, requant, seed)

                def add(method, top1, fq=None, seconds=None):
                    if key(method) in done:
                        return
                    rows.append(dict(zip(("method", "w_bits", "a_bits", "requant", "seed"), key(method)),
                                     top1=top1, fakequant_top1=fq, seconds=seconds))
                    done.add(key(method))
                    tmp = path.with_suffix(".tmp")  # a crash mid-write must not lose the rows
                    tmp.write_text(json.dumps(rows, indent=1))
                    tmp.replace(path)

                t0 = time.time()
                _, qat_vars = run_teacher_phases(ctx, ledger, qat=True)
                first.setdefault(seed, sub)
                add("teacher", ledger.get("teacher")["top1"])
                add("qat_teacher", ledger.get("qat")["top1"])
                run_distill(ctx, ledger)
                ex = export_student(ctx, ledger)["metrics"]
                add("ptl", ex["student_int_top1"], ex["student_fakequant_top1"], round(time.time() - t0, 1))
                for name in config.sweep.baselines:
                    t0 = time.time()
                    k = f"export/{name}"
                    if not ledger.done(k):
                        params = run_baseline(ctx, ledger, qat_vars, name)
                        export_student(ctx, ledger, params=params, out_dir=sub / "baselines" / name / "export", key=k)
                    rec = ledger.get(k)
                    add(name, rec["student_int_top1"], rec["student_fakequant_top1"], round(time.time() - t0, 1))
    (out / "table.md").write_text(results_table(rows))
    return rows


def results_table(rows: list[dict]) -> str:
    """Markdown: one row per (method, requant) that has results, one column per bit width,
    mean ± std (n) of top-1; then the same grid of mean wall seconds (training and export)."""
    bits = sorted({(r["w_bits"], r["a_bits"]) for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    requants = list(dict.fromkeys(r["requant"] for r in rows))

    def grid(title: str, cell) -> list[str]:
        lines = [f"| {title} | requant | " + " | ".join(f"W{w}A{a}" for w, a in bits) + " |",
                 "|" + "---|" * (2 + len(bits))]
        for rq in requants:
            for m in methods:
                sel = lambda w, a: [r for r in rows if (r["method"], r["requant"], r["w_bits"], r["a_bits"])
                                    == (m, rq, w, a)]
                cells = [cell(sel(w, a)) for w, a in bits]  # None: nothing measured there
                if any(c is not None for c in cells):  # a partial sweep or an untimed method: no empty rows
                    lines.append(f"| {m} | {rq} | " + " | ".join("–" if c is None else c for c in cells) + " |")
        return lines

    def top1(sel):
        v = [r["top1"] for r in sel if r["top1"] is not None]
        return f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f} (n={len(v)})" if v else None

    def seconds(sel):
        v = [r["seconds"] for r in sel if r.get("seconds")]
        return f"{np.mean(v):.0f}" if v else None

    timed = any(r.get("seconds") for r in rows)
    lines = grid("method", top1) + ([""] + grid("wall s", seconds) if timed else [])
    return "\n".join(lines) + "\n"
