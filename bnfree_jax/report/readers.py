"""Read the job's side files for the report: training log, artifact manifest, sweep results.

Each reader returns an empty value when its file is missing or unreadable, so a report
of a partial job still gets written.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

from bnfree_jax.report.results_table import mean_std
from etils.epath import Path


def _records(path: Path):
    """metrics.jsonl's records (dicts) in file order; a line that is not one (a torn write
    of a killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield rec


def read_metrics(path: Path) -> dict:
    """metrics.jsonl → {phase: (steps, losses)} in file order of first appearance, sorted by step.

    A resumed phase may log a step twice; the last value wins.
    """
    by_phase: dict = {}
    for rec in _records(path):
        if "step" not in rec:
            continue
        loss = rec.get("loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        by_phase.setdefault(str(rec.get("phase", "train")), {})[int(rec["step"])] = float(loss)
    return {ph: (sorted(d), [d[k] for k in sorted(d)]) for ph, d in by_phase.items()}


DIAGNOSTIC_PREFIXES = ("grad_norm/", "clip_hi/", "clip_lo/", "ste_cos/")  # train/diagnostics.py's keys


def read_diagnostics(path: Path) -> dict:
    """metrics.jsonl → {phase: {diagnostic key: value}}: each phase's last logged gradient
    diagnostics (its state at the end of the phase), phases in order of first appearance."""
    out: dict = {}
    for rec in _records(path):
        found = {k: float(v) for k, v in rec.items() if k.startswith(DIAGNOSTIC_PREFIXES)
                 and isinstance(v, (int, float)) and math.isfinite(v)}
        if found:
            out.setdefault(str(rec.get("phase", "train")), {}).update(found)
    return out


def read_manifest(workdir: Path) -> dict:
    path = Path(workdir) / "export" / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_sweep(workdir: Path) -> list:
    """Rows of DIR/sweep/results.json that carry a method, bit widths and a top-1."""
    path = Path(workdir) / "sweep" / "results.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    keep = ("method", "w_bits", "a_bits", "top1")
    return [r for r in rows if isinstance(r, dict) and all(r.get(k) is not None for k in keep)]


def sweep_series(rows: list) -> dict:
    """{method label: [(w_bits, a_bits, mean top-1, sample std top-1, n seeds)]} sorted by bits.

    The spread is `mean_std`'s, so the plot and the results table quote the same figure.

    Rows of one method with different requantisation granularity become separate series.
    """
    requants = {r.get("requant") for r in rows}
    groups = defaultdict(list)
    for r in rows:
        label = str(r["method"]) + (f" ({r.get('requant')})" if len(requants) > 1 else "")
        groups[(label, int(r["w_bits"]), int(r["a_bits"]))].append(float(r["top1"]))
    out = defaultdict(list)
    for (label, w, a), vals in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        mean, std = mean_std(vals)
        out[label].append((w, a, mean, std, len(vals)))
    return dict(out)
