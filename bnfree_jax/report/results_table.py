"""The sweep's results table, and the one mean ± std every published figure is quoted with.

The spread is the SAMPLE standard deviation (n − 1 divisor): the seeds are a sample of
the runs one could make, and the table (`results_table`) and the accuracy-vs-bits plot
(`sources.sweep_series`) must quote the same number for the same cell.
"""

from __future__ import annotations

import math


def mean_std(values) -> tuple[float, float]:
    """(mean, sample std) of the values; the std is 0 for a single value (nothing to spread)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std: no values (a cell with no measurement has no mean)")
    mean = math.fsum(v) / len(v)
    if len(v) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (len(v) - 1))


def results_table(rows: list[dict]) -> str:
    """Markdown: one row per (method, requant) that has results, one column per bit width,
    mean ± sample std (n) of top-1; then the same grid of mean wall seconds (training and export)."""
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
        if not v:
            return None
        mean, std = mean_std(v)
        return f"{100 * mean:.2f} ± {100 * std:.2f} (n={len(v)})"

    def seconds(sel):
        v = [r["seconds"] for r in sel if r.get("seconds")]
        return f"{mean_std(v)[0]:.0f}" if v else None

    timed = any(r.get("seconds") for r in rows)
    lines = grid("method", top1) + ([""] + grid("wall s", seconds) if timed else [])
    return "\n".join(lines) + "\n"
