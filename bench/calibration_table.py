"""The calibration table for the docs: `bnfree ptq-sweep`'s rows beside trained PTL
students at the same bits (project venv; reads finished workdirs, trains nothing).

    python bench/calibration_table.py --sweep runs/ptqsweep \
        --student w8a8/layer=runs/ptl_w8a8 --student w4a4/layer=runs/quickstart \
        --out docs/results/calibration.json --plot docs/results/calibration.png

Each student's figure is its artifact's integer top-1 (phases.json `export`); it must have
the sweep's float teacher (same teacher top-1) and the bits and requant it is listed for.
Prints the markdown table, then the JSON result as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit  # noqa: E402
from bnfree_jax.pipeline.ptq_sweep import calibration_curves, sweep_table  # noqa: E402
from bnfree_jax.report.plots import plot_calibration  # noqa: E402


def student(spec: str, teacher_top1: float) -> tuple[tuple[str, str], dict]:
    """'wXaY/requant=WORKDIR' -> ((wXaY, requant), its record), checked against its config."""
    key, sep, workdir = spec.partition("=")
    bits, _, requant = key.partition("/")
    if not sep or not requant:
        raise SystemExit(f"--student {spec!r}: expected wXaY/requant=WORKDIR")
    phases = json.load(open(os.path.join(workdir, "phases.json")))
    model = json.load(open(os.path.join(workdir, "config.json")))["model"]
    if (f"w{model['w_bits']}a{model['a_bits']}", model["requant"]) != (bits, requant):
        raise SystemExit(f"--student {spec!r}: the job is W{model['w_bits']}A{model['a_bits']} {model['requant']}")
    if phases["teacher"]["top1"] != teacher_top1:
        raise SystemExit(f"--student {spec!r}: its float teacher ({phases['teacher']['top1']}) is not the sweep's "
                         f"({teacher_top1})")
    return (bits, requant), {"workdir": workdir, "student_int_top1": phases["export"]["student_int_top1"],
                             "int_sim_bit_exact": phases["export"]["int_sim_bit_exact"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", required=True, help="the ptq-sweep workdir")
    ap.add_argument("--student", action="append", default=[], help="wXaY/requant=WORKDIR of a finished job")
    ap.add_argument("--out", help="JSON file of the rows and students")
    ap.add_argument("--plot", help="PNG: top-1 vs calibration images per method, students as lines")
    a = ap.parse_args()
    rows = json.load(open(os.path.join(a.sweep, "ptq_sweep", "results.json")))
    teacher = {r["teacher_top1"] for r in rows}
    if len(teacher) != 1:
        raise SystemExit(f"the sweep's rows have several float teachers: {sorted(teacher)}")
    teacher_top1 = teacher.pop()
    students = dict(student(s, teacher_top1) for s in a.student)
    table = sweep_table(rows, {k: v["student_int_top1"] for k, v in students.items()})
    print(table)
    curves, refs = calibration_curves(rows)
    for k, v in students.items():
        refs.setdefault(k, {})["PTL student"] = v["student_int_top1"]
    if a.plot:
        plot_calibration(curves, refs, a.plot)
    result = {"bench": "calibration_table", "rows": len(rows), "verified_rows": sum(r.get("verified", True) for r in rows),
              "all_bit_exact": all(r["bit_exact"] for r in rows),
              "students": {f"{b}/{r}": v for (b, r), v in students.items()}}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({**result, "results": rows}, fh, indent=1)
    emit(result)


if __name__ == "__main__":
    main()
