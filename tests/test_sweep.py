"""Baselines share PTL's budget; a tiny sweep produces a row for every method."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnfree_jax.config_io import load_config
from bnfree_jax.distill.baselines import BASELINES, baseline_plan
from bnfree_jax.distill.plan import build_stage_plan, total_steps
from bnfree_jax.pipeline.sweep import results_table

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["conv1", "conv2", "fc3"]


def test_every_trained_baseline_gets_the_ptl_budget():
    cfg = load_config("configs/mnist_alexnet.py").ptl
    budget = total_steps(build_stage_plan(cfg, NAMES))
    for name in BASELINES:
        plan, init = baseline_plan(name, cfg, NAMES)
        assert total_steps(plan) == (0 if name == "fold" else budget), name
        assert init == ("scratch" if name == "scratch" else "fold")
    no_comp, _ = baseline_plan("no_comp", cfg, NAMES)
    assert all(not s.groups("trainable") or all(g.startswith("S:") for g in s.groups("trainable")) for s in no_comp)
    no_local, _ = baseline_plan("no_local", cfg, NAMES)
    assert no_local[0].kind == "tandem"


def test_results_table_mean_and_std():
    rows = [dict(method="ptl", w_bits=4, a_bits=4, requant="layer", seed=s, top1=v, seconds=t)
            for s, (v, t) in enumerate([(0.98, 100.0), (0.99, 110.0), (1.0, 150.0)])]
    table = results_table(rows)
    assert "| ptl | layer | 99.00 ± 0.82 (n=3) |" in table
    assert "| ptl | layer | 120 |" in table  # mean wall seconds
    partial = rows + [dict(method="fold", w_bits=2, a_bits=2, requant="channel", seed=0, top1=0.5, seconds=None)]
    table = results_table(partial)
    assert "| fold | channel | – | 50.00 ± 0.00 (n=1) |" in table
    assert "| ptl | channel |" not in table and "| fold | layer |" not in table  # no rows without results
    assert table.count("| fold | channel |") == 1  # untimed: no row in the wall-seconds grid


@pytest.mark.slow
def test_tiny_sweep_has_a_row_per_method(tmp_path):
    args = ["sweep", "--config", "configs/mnist_sweep.py:quick,layer", "--workdir", str(tmp_path / "sw"),
            "model.name='tiny_cnn'", "data.max_train_examples=512", "data.max_test_examples=256",
            "data.eval_batch=256", "teacher.batch=32", "qat.batch=32", "ptl.batch=32", "teacher.steps=20",
            "qat.steps=10", "ptl.local_init_steps=2", "ptl.stage_steps=3", "ptl.finetune_steps=3",
            "sweep.bits=['w4a4']", "sweep.binary_qat_steps=10"]
    p = subprocess.run([sys.executable, "-m", "bnfree_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "sw" / "sweep" / "results.json").read_text())
    methods = {r["method"] for r in rows}
    assert methods == {"teacher", "qat_teacher", "ptl", *BASELINES}
    assert all(0.0 <= r["top1"] <= 1.0 for r in rows)
    assert "| fold_qat | layer |" in (tmp_path / "sw" / "sweep" / "table.md").read_text()
