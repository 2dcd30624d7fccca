"""The README's results table is the rendering of the committed sweep rows, so one cannot
be edited without the other."""

import json
from pathlib import Path

from bnfree_jax.pipeline.sweep import results_table

ROOT = Path(__file__).resolve().parents[1]


def _published_rows() -> list[dict]:
    return json.loads((ROOT / "docs" / "results" / "mnist_sweep.json").read_text())


def test_readme_table_is_rendered_from_committed_rows():
    rows = _published_rows()
    assert rows, "no published rows"
    assert {"method", "w_bits", "a_bits", "requant", "seed", "top1"} <= set(rows[0])
    table = results_table(rows)
    assert table.strip() in (ROOT / "README.md").read_text()


def test_published_rows_are_unique_and_in_range():
    rows = _published_rows()
    keys = [(r["method"], r["w_bits"], r["a_bits"], r["requant"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (method, bits, requant, seed) row appears twice"
    assert all(0.0 < r["top1"] <= 1.0 for r in rows)
