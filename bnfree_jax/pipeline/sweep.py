"""`bnfree sweep`: PTL and every baseline over bit widths × requant settings × seeds.

One sub-job per (bits, requant, seed) in DIR/<wXaY>_<requant>_s<seed>, each an ordinary
resumable job; the float teacher of a seed is trained once and shared; PTL's student
trains before the baselines', after them or not at all (`sweep.ptl`). Rows accumulate in
DIR/sweep/results.json (a rerun skips finished rows); DIR/sweep/table.md is the table.
"""

from __future__ import annotations

import copy
import time

from bnfree_jax.config_io import setting
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.pipeline.distill_phase import baseline_student, run_distill
from bnfree_jax.pipeline.export_phase import export_student
from bnfree_jax.pipeline.job import pin_config
from bnfree_jax.pipeline.jsonfile import read_json, write_json
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.teacher import run_teacher_phases
from bnfree_jax.pipeline.validate import validate_config
from bnfree_jax.report.results_table import results_table
from bnfree_jax.data.storage import Path, as_path, copy_tree


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
    copy_tree(src / "teacher" / "variables", dst / "teacher" / "variables")
    # a teacher from before code and layout were recorded: unknown
    record = {"code": None, "layout": None, **Ledger(src).get("teacher")}
    Ledger(dst).mark_done("teacher", **{k: v for k, v in record.items() if k != "done"})


def _methods(config) -> list[str]:
    """The students of each sub-job in the order they train: `sweep.ptl` puts PTL first
    (the default), last (the baselines' rows come in first) or nowhere."""
    where, baselines = setting(config, "sweep.ptl"), list(config.sweep.baselines)
    return {"first": ["ptl", *baselines], "last": [*baselines, "ptl"], "skip": baselines}[where]


def run_sweep(config, workdir: Path, log=print) -> list[dict]:
    out = as_path(workdir) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    rows = read_json(path, "it holds the finished rows of this sweep: restore it or delete it", list) \
        if path.exists() else []
    done = {(r["method"], r["w_bits"], r["a_bits"], r["requant"], r["seed"]) for r in rows}
    first = {}
    for seed in config.sweep.seeds:
        for bits in config.sweep.bits:
            for requant in config.sweep.requant:
                c = _sub_config(config, bits, requant, seed)
                validate_config(c)
                sub = as_path(workdir) / f"{bits}_{requant}_s{seed}"
                ctx = make_context(c, sub, log=log)
                pin_config(c, sub)
                if seed in first:
                    _share_teacher(first[seed], sub)
                ledger = Ledger(sub)
                key = lambda m: (m, c.model.w_bits, c.model.a_bits, requant, seed)

                def add(method, record, top1="top1", seconds=None):
                    """The row of `method` from its ledger `record` (its commit and devices: the code and
                    layout that finished it)."""
                    if key(method) in done:
                        return
                    rows.append(dict(zip(("method", "w_bits", "a_bits", "requant", "seed"), key(method)),
                                     top1=record[top1], fakequant_top1=record.get("student_fakequant_top1"),
                                     seconds=seconds, commit=(record.get("code") or {}).get("commit"),
                                     devices=(record.get("layout") or {}).get("devices")))
                    done.add(key(method))
                    write_json(path, rows, indent=1)  # a crash mid-write must not lose the rows

                t0 = time.time()
                _, qat_vars = run_teacher_phases(ctx, ledger, qat=True)
                first.setdefault(seed, sub)
                add("teacher", ledger.get("teacher"))
                add("qat_teacher", ledger.get("qat"))
                for name in _methods(config):
                    if name == "ptl":
                        run_distill(ctx, ledger)
                        export_student(ctx, ledger)
                        add("ptl", ledger.get("export"), "student_int_top1", round(time.time() - t0, 1))
                    else:
                        k = f"export/{name}"
                        if not ledger.done(k):
                            params = baseline_student(ctx, ledger, qat_vars, name)
                            export_student(ctx, ledger, params=params, out_dir=sub / "baselines" / name / "export",
                                           key=k)
                        add(name, ledger.get(k), "student_int_top1", round(time.time() - t0, 1))
                    t0 = time.time()
    (out / "table.md").write_text(results_table(rows))
    return rows
