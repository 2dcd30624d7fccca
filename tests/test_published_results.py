"""docs/results.md's results table is the rendering of the committed sweep rows, so one
cannot be edited without the other; the readings quote the table's own mean ± std; and
the table and the accuracy-vs-bits plot quote one spread, the sample std."""

import json
import re
from pathlib import Path

import pytest

from bnfree_jax.report.results_table import mean_std, results_table
from bnfree_jax.report.readers import sweep_series

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "results.md"
MEAN_STD = re.compile(r"(\d+\.\d\d) ±\s+(\d+\.\d\d)")


def _published_rows() -> list[dict]:
    return json.loads((ROOT / "docs" / "results" / "mnist_sweep.json").read_text())


def test_results_md_table_is_rendered_from_committed_rows():
    rows = _published_rows()
    assert rows, "no published rows"
    assert {"method", "w_bits", "a_bits", "requant", "seed", "top1"} <= set(rows[0])
    assert results_table(rows).strip() in RESULTS_MD.read_text()


def test_published_rows_are_unique_and_in_range():
    rows = _published_rows()
    keys = [(r["method"], r["w_bits"], r["a_bits"], r["requant"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (method, bits, requant, seed) row appears twice"
    assert all(0.0 < r["top1"] <= 1.0 for r in rows)


def test_readings_quote_the_tables_mean_and_std():
    """Every 'mean ± std' in the text is a table cell, or one of the head_layers=3 figures
    computed (with the same helper) from the per-seed values quoted in docs/ptl.md."""
    cells = set(MEAN_STD.findall(results_table(_published_rows())))
    head3 = {tuple(f"{x:.2f}" for x in mean_std(v)) for v in ([98.70, 98.57, 98.88], [99.35, 99.23, 99.29])}
    quoted = MEAN_STD.findall(RESULTS_MD.read_text())
    assert len(quoted) > len(cells)  # the readings quote some
    deep = set(MEAN_STD.findall(_deep_markdown())) | _bn_free_cells()
    assert [q for q in quoted if q not in cells | head3 | _precision_cells() | _calibration_cells() | deep] == []


def _precision_cells() -> set:
    """'mean ± std' of each configuration of docs/results/precision.json, recomputed from its
    per-job rows (top-1 in %, latencies in ms)."""
    rows = json.loads((ROOT / "docs" / "results" / "precision.json").read_text())["rows"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["precision"], r["qat_steps"]), []).append(r)
    out = set()
    for rs in groups.values():
        for key, scale in (("test_int_top1", 100), ("latency_ms_p50", 1), ("latency_ms_p95", 1)):
            out.add(tuple(f"{scale * x:.2f}" for x in mean_std([r[key] for r in rs])))
    return out


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([0.98, 0.99, 1.0])
    assert mean == pytest.approx(0.99) and std == pytest.approx(0.01)  # n − 1 divisor (population: 0.0082)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_std([])


def test_table_and_plot_series_quote_the_same_std():
    rows = [r for r in _published_rows() if r["requant"] == "layer"]  # one requant: plain method labels
    header, _, *lines = results_table(rows).split("\n\n")[0].splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = {(c[0].strip(), columns[i]): c[i].strip()
             for c in (l.strip("|").split("|") for l in lines) for i in range(2, len(columns))}
    for method, points in sweep_series(rows).items():
        for w, a, mean, std, n in points:
            assert cells[(method, f"W{w}A{a}")] == f"{100 * mean:.2f} ± {100 * std:.2f} (n={n})"


def _calibration_cells() -> set:
    """'mean ± std' of each (method, bits, requant, images) of the calibration table's rows
    (docs/results/calibration.json and calibration_low_bits.json), recomputed in %."""
    from bnfree_jax.pipeline.ptq_sweep import method_label

    rows = json.loads((ROOT / "docs" / "results" / "calibration.json").read_text())["results"]
    rows += json.loads((ROOT / "docs" / "results" / "calibration_low_bits.json").read_text())
    groups: dict = {}
    for r in rows:
        groups.setdefault((method_label(r), r["w_bits"], r["a_bits"], r["requant"], r["images"]), []).append(r["top1"])
    return {tuple(f"{x:.2f}" for x in mean_std([100 * t for t in v])) for v in groups.values()}


def test_calibration_section_quotes_its_rows():
    """Every 'mean ± std' after the calibration heading is recomputable from its rows."""
    text = RESULTS_MD.read_text()
    section = text[text.index("## PTQ or PTL: the calibration table"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    quoted = MEAN_STD.findall(section)
    assert len(quoted) >= 144 + 18  # the table's cells and the low-bit rows
    assert [q for q in quoted if q not in _calibration_cells()] == []


def _deep_rows() -> list[dict]:
    return json.loads((ROOT / "docs" / "results" / "deep_plain.json").read_text())["rows"]


def _deep_markdown() -> str:
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import deep_plain_table
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return deep_plain_table.markdown(_deep_rows())


def _bn_free_cells() -> set:
    """'mean ± std' of each (convs, BN) of docs/results/bn_free_scratch.json, recomputed in %
    from its per-seed runs."""
    runs = json.loads((ROOT / "docs" / "results" / "bn_free_scratch.json").read_text())["runs"]
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["convs"], r["bn"]), []).append(100 * r["top1"])
    return {tuple(f"{x:.2f}" for x in mean_std(v)) for v in groups.values()}


def test_deep_section_is_rendered_from_its_rows():
    """The deep plain network's comparison table is bench/deep_plain_table.py's rendering of
    the committed rows (test-split figures of integer artifacts, one row per method, bits,
    seed), and every 'mean ± std' of the section is recomputable from those rows or from
    the from-scratch runs."""
    text = RESULTS_MD.read_text()
    section = text[text.index("## Where BatchNorm matters: the deep plain network"):]
    rows = _deep_rows()
    keys = [(r["method"], r["bits"], r["requant"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert all(0.0 < r["student_int_top1"] <= 1.0 and r["n_test"] == 10000 for r in rows if "student_int_top1" in r)
    assert _deep_markdown().strip() in section
    cells = set(MEAN_STD.findall(_deep_markdown())) | _bn_free_cells()
    quoted = MEAN_STD.findall(section)
    assert len(quoted) >= 6
    assert [q for q in quoted if q not in cells] == []
