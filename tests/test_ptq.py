"""`bnfree ptq` and `bnfree ptq-sweep` end to end on the tiny job's float teacher: the
artifact is verified like `bnfree run`'s, each act_alpha is what a streaming calibrator
gives on the same images, bad input is one line (status 2) that leaves the workdir as it
was, and the sweep resumes its finished rows on one shared teacher."""

import json
import shutil
import sys

import numpy as np
import pytest

from job_helpers import CONFIG, ROOT, TINY, bnfree

sys.path.insert(0, str(ROOT / "bench"))

PTQ_MINMAX = ["--calib", "minmax", "--calib-images", "100"]


@pytest.fixture(scope="module")
def teacher_wd(tmp_path_factory):
    """A workdir whose float teacher is trained (the tiny job's config)."""
    wd = tmp_path_factory.mktemp("ptq_teacher") / "wd"
    p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(wd), *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


@pytest.fixture(scope="module")
def ptq_wd(teacher_wd, tmp_path_factory):
    """A copy of the teacher workdir after `bnfree ptq --calib minmax --calib-images 100`."""
    wd = tmp_path_factory.mktemp("ptq_job") / "wd"
    shutil.copytree(teacher_wd, wd, ignore=shutil.ignore_patterns(".lock"))
    p = bnfree("ptq", "--config", CONFIG, "--workdir", str(wd), *PTQ_MINMAX, *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return wd, json.loads(p.stdout.strip().splitlines()[-1])


def _tree(path):
    """{relative path: bytes} of every file under `path` (the lock file aside)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != ".lock"}


def test_ptq_exports_a_verified_artifact_with_a_report(ptq_wd, teacher_wd):
    wd, line = ptq_wd
    out = wd / "ptq" / "minmax_n100_wminmax_s0"
    assert line["artifact"] == str(out / "export")
    assert line["int_sim_bit_exact"] is True and line["interpreter_float_ops"] == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["calibration"]["method"] == "minmax"
    assert summary["calibration"]["images"] == 100 and summary["calibration"]["seed"] == 0
    assert summary["int_sim_bit_exact"] and summary["bn_ops_in_artifact"] == 0
    assert summary["qat_teacher_top1"] is None  # PTQ trains nothing after the float teacher
    assert summary["student_int_top1"] > summary["teacher_top1"] - 0.05
    assert (out / "report" / "report.md").exists() and (out / "report" / "scales.png").exists()
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["config"]["ptq"]["method"] == "minmax"
    # the float teacher was reused, not retrained
    teacher = lambda w: json.loads((w / "phases.json").read_text())["teacher"]
    assert teacher(wd) == teacher(teacher_wd)


def test_ptq_rerun_keeps_the_verified_artifact(ptq_wd, tmp_path):
    wd, _ = ptq_wd
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy, ignore=shutil.ignore_patterns(".lock"))
    art = copy / "ptq" / "minmax_n100_wminmax_s0" / "export" / "model.safetensors"
    before = art.read_bytes()
    p = bnfree("ptq", "--config", CONFIG, "--workdir", str(copy), *PTQ_MINMAX, *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    assert art.read_bytes() == before
    assert "exporting again" not in p.stderr


def _context(wd):
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.pipeline.validate import load_valid_config

    return make_context(load_valid_config(CONFIG, TINY), wd, log=lambda m: None)


def _float_teacher(ctx):
    from bnfree_jax.pipeline.ledger import Ledger
    from bnfree_jax.pipeline.teacher import run_teacher_phases

    return run_teacher_phases(ctx, Ledger(ctx.workdir), qat=False)[0]


def _layer_inputs(ctx, params, images, index):
    """The pooled ReLU input of layer `index`'s activation quantizer, all images at once."""
    import flax.linen as nn

    from bnfree_jax.nn.network import STUDENT

    spec = ctx.nets.specs()[index]
    _, trace = ctx.nets.network(STUDENT).apply({"params": params}, images, stop=index + 1, capture=True)
    a = np.maximum(np.asarray(trace[-1][1]), 0)
    return np.asarray(nn.max_pool(a, (spec.pool,) * 2, strides=(spec.pool,) * 2)) if spec.pool else a


def test_act_alpha_is_the_calibrators_result_on_the_same_images(ptq_wd):
    """Recomputed independently: the sample drawn by seed 0 from the training images, the
    prefix quantized with the recorded clips, one calibrator fed everything at once."""
    from bnfree_jax import quant
    from bnfree_jax.pipeline.ptq import fold_float_teacher

    wd, _ = ptq_wd
    alphas = json.loads((wd / "ptq" / "minmax_n100_wminmax_s0" / "report" / "summary.json")
                        .read_text())["calibration"]["act_alpha"]
    ctx = _context(wd)
    train = ctx.feed.train_source
    idx = np.sort(np.random.default_rng(0).choice(len(train), 100, replace=False))
    images = np.stack([train[int(i)]["image"] for i in idx])
    params = fold_float_teacher(ctx.nets, _float_teacher(ctx))
    for s in ctx.nets.specs():
        if s.name in alphas:
            params[s.name]["act_alpha"] = np.float32(alphas[s.name])
    names = [s.name for s in ctx.nets.specs()]
    assert sorted(alphas) == ["conv1", "conv2"]
    for name in alphas:
        x = _layer_inputs(ctx, params, images, names.index(name))
        expected = float(quant.calibrate(x, "minmax", 4, signed=False))
        assert alphas[name] == pytest.approx(expected, rel=1e-6)


def test_streamed_batches_give_the_calibrator_of_all_images(ptq_wd, monkeypatch):
    """Several small batches through `ptq_student` == one StreamingCalibrator over the same
    activations (percentile, which differs from minmax, so the method reaches it)."""
    from bnfree_jax import data as data_lib
    from bnfree_jax import quant
    from bnfree_jax.pipeline import ptq

    wd, _ = ptq_wd
    ctx = _context(wd)
    monkeypatch.setattr(ptq, "CALIB_BATCH", 16)
    opts = ptq.PtqOptions(method="percentile", images=50, percentile=99.0, seed=3)
    params, record = ptq.ptq_student(ctx, _float_teacher(ctx), opts)
    train = ctx.feed.train_source
    idx = data_lib.sample_indices(len(train), 50, 3)
    assert len(set(idx.tolist())) == 50 and idx.max() < len(train)
    images = np.stack([train[int(i)]["image"] for i in idx])
    x = _layer_inputs(ctx, params, images, 0)
    cal = quant.StreamingCalibrator("percentile", 4, signed=False, percentile=99.0)
    for lo in range(0, 50, 16):
        cal.update(x[lo:lo + 16])
    assert record["act_alpha"]["conv1"] == pytest.approx(float(cal.compute_amax()), rel=1e-5)
    assert record["act_alpha"]["conv1"] < float(x.max())  # a percentile, not the max


def test_mse_weight_calibration_clips_to_the_mse_range(ptq_wd):
    """--weight-calib mse: the student's max-abs scale is the MSE-optimal range."""
    from bnfree_jax import quant
    from bnfree_jax.nn.weights import student_weight
    from bnfree_jax.pipeline.ptq import clip_weights_mse, fold_float_teacher

    wd, _ = ptq_wd
    ctx = _context(wd)
    folded = fold_float_teacher(ctx.nets, _float_teacher(ctx))
    clipped = clip_weights_mse(ctx.nets, folded)
    spec = ctx.nets.specs()[1]  # conv2: W4, per tensor
    w = np.asarray(folded["conv2"]["kernel"])
    amax = float(quant.calibrate(w, "mse", spec.w_bits, signed=True))
    assert amax < np.abs(w).max()
    scale = float(student_weight(clipped["conv2"]["kernel"], spec.w_bits, False)[1])
    assert scale == pytest.approx(amax / 7, rel=1e-6)


@pytest.mark.parametrize("args, says", [
    (["--calib", "kl"], "--calib 'kl' is not a calibrator"),
    (["--calib-images", "0"], "--calib-images 0"),
    (["--calib-images", "5000"], "exceeds the 1024 training images"),
    (["--calib", "percentile", "--percentile", "0"], "outside (0, 100]"),
    (["--calib", "percentile", "--percentile", "100.5"], "outside (0, 100]"),
    (["--weight-calib", "lsq"], "--weight-calib 'lsq'"),
    (["model.w_bits=2"], "was started with a different config (changed: "),
])
def test_bad_input_is_one_line_and_leaves_the_workdir(teacher_wd, tmp_path, capsys, args, says):
    from bnfree_jax import cli

    wd = tmp_path / "wd"
    shutil.copytree(teacher_wd, wd, ignore=shutil.ignore_patterns(".lock"))
    before = _tree(wd)
    fresh = tmp_path / "fresh"
    for target in (wd, fresh):
        if target == fresh and args[0].startswith("model."):
            continue  # a fresh workdir has no pinned config to differ from
        with pytest.raises(SystemExit) as stop:
            cli.main(["ptq", "--config", CONFIG, "--workdir", str(target), *TINY, *args])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not args[0].startswith("model.") or "model.w_bits" in err[0]
    assert _tree(wd) == before and not fresh.exists()


def test_ptq_sweep_shares_one_teacher_and_resumes(tmp_path, capsys):
    from bnfree_jax import cli

    wd = tmp_path / "sweep"
    argv = ["ptq-sweep", "--config", "configs/mnist_ptq_sweep.py:quick", "--workdir", str(wd), *TINY,
            "ptq_sweep.methods=['minmax']", "ptq_sweep.bits=['w8a8']", "ptq_sweep.images=[64]",
            "ptq_sweep.requant=['layer','channel']"]
    assert cli.main(argv) == 0
    rows = json.loads((wd / "ptq_sweep" / "results.json").read_text())
    assert [(r["requant"], r["method"], r["images"], r["bit_exact"]) for r in rows] == \
        [("layer", "minmax", 64, True), ("channel", "minmax", 64, True)]
    assert rows[0]["teacher_top1"] == rows[1]["teacher_top1"]
    assert not (wd / "w8a8_channel" / "checkpoints" / "teacher").exists()  # copied, not trained
    assert "| minmax | W8A8 | channel |" in (wd / "ptq_sweep" / "table.md").read_text()
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert json.loads((wd / "ptq_sweep" / "results.json").read_text()) == rows
    assert "[ptq]" not in capsys.readouterr().err  # nothing calibrated again


def test_float_onnx_graph_is_the_folded_float_teacher(ptq_wd):
    """bench/ptq_vs_ort.py's float graph computes the float teacher's logits."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from _onnx import float_onnx, onnx_input

    from bnfree_jax.nn.network import STUDENT, TEACHER
    from bnfree_jax.pipeline.ptq import fold_float_teacher

    wd, _ = ptq_wd
    ctx = _context(wd)
    teacher = _float_teacher(ctx)
    images = ctx.feed.eval_arrays(64)[0]
    path = str(wd / "float.onnx")
    net = ctx.nets.network(STUDENT)
    float_onnx(ctx.nets.specs(quantized=False), fold_float_teacher(ctx.nets, teacher), net.inv_std,
               ctx.nets.image_shape, path)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": onnx_input(images, net.zero_point)})[0]
    want = np.asarray(ctx.nets.network(TEACHER, quantized=False).apply(teacher, images))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_measured_sweep_row_is_what_the_full_ptq_gives(tmp_path):
    """ptq_sweep.verify='first': the second row of a sub-job is measured (interpreter over
    the evaluation split, no report); `bnfree ptq`'s full path on the same calibration
    writes the same tensors and finds the same integer top-1."""
    from bnfree_jax import cli
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.pipeline.ledger import Ledger
    from bnfree_jax.pipeline.ptq import PtqOptions, run_ptq
    from bnfree_jax.pipeline.ptq_sweep import sub_config
    from bnfree_jax.pipeline.validate import load_valid_config

    wd = tmp_path / "sweep"
    extra = [*TINY, "ptq_sweep.methods=['minmax']", "ptq_sweep.bits=['w8a8']", "ptq_sweep.images=[64, 100]",
             "ptq_sweep.requant=['layer']"]
    assert cli.main(["ptq-sweep", "--config", "configs/mnist_ptq_sweep.py:quick", "--workdir", str(wd), *extra]) == 0
    rows = json.loads((wd / "ptq_sweep" / "results.json").read_text())
    assert [(r["images"], r["verified"], r["bit_exact"]) for r in rows] == [(64, True, True), (100, False, True)]
    tag = wd / "w8a8_layer" / "ptq" / "minmax_n100_wminmax_s0"
    measured = (tag / "export" / "model.safetensors").read_bytes()
    assert not (tag / "report").exists()
    c = sub_config(load_valid_config("configs/mnist_ptq_sweep.py:quick", extra), "w8a8", "layer")
    ctx = make_context(c, wd / "w8a8_layer", log=lambda m: None)
    s = run_ptq(ctx, Ledger(ctx.workdir), PtqOptions(method="minmax", images=100))
    assert (tag / "export" / "model.safetensors").read_bytes() == measured
    assert s["student_int_top1"] == rows[1]["top1"] and s["int_sim_bit_exact"]


def test_calibration_table_puts_each_student_beside_its_bits(tmp_path):
    """sweep_table's PTL column: the student of the row's (bits, requant), n/a without one;
    calibration_curves: mean and std over the samples per number of images."""
    from bnfree_jax.pipeline.ptq_sweep import calibration_curves, sweep_table

    row = dict(method="minmax", percentile=None, w_bits=8, a_bits=8, requant="layer", weight_calib="minmax",
               teacher_top1=0.99, verified=False, bit_exact=True)
    rows = [{**row, "images": 64, "sample": 0, "top1": 0.98}, {**row, "images": 64, "sample": 1, "top1": 0.96},
            {**row, "w_bits": 4, "a_bits": 4, "images": 64, "sample": 0, "top1": 0.9}]
    lines = sweep_table(rows, {("w8a8", "layer"): 0.9925}).splitlines()
    assert lines[0].endswith("| PTL student |")
    assert lines[2] == "| minmax | W8A8 | layer | 97.00 ± 1.41 (2) | 99.25 |"  # the sample std
    assert lines[3] == "| minmax | W4A4 | layer | 90.00 ± 0.00 (1) | n/a |"
    mse_weights = sweep_table([{**rows[0], "weight_calib": "mse"}, rows[0]]).splitlines()
    assert mse_weights[2:] == ["| minmax, weights mse | W8A8 | layer | 98.00 ± 0.00 (1) |",
                               "| minmax | W8A8 | layer | 98.00 ± 0.00 (1) |"]
    curves, refs = calibration_curves(rows)
    assert curves[("w8a8", "layer")]["minmax"] == [(64, pytest.approx(0.97), pytest.approx(0.02 ** 0.5 / 10), 2)]
    assert refs[("w4a4", "layer")] == {"float teacher": 0.99}
    from bnfree_jax.report.plots import plot_calibration

    out = plot_calibration(curves, refs, tmp_path / "calibration.png")
    assert out is not None and (tmp_path / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_calibration({}, {}, tmp_path / "none.png") is None


def test_the_verified_row_of_a_sub_job_is_read_from_the_rows():
    """A sub-job counts as verified only by a finished row run as `bnfree ptq` (not by a
    ptq/ directory a killed first row left behind); rows older than the key were."""
    import ml_collections

    from bnfree_jax.pipeline.ptq_sweep import has_verified_row

    c = ml_collections.ConfigDict({"model": {"w_bits": 8, "a_bits": 8, "requant": "layer"}})
    row = {"w_bits": 8, "a_bits": 8, "requant": "layer"}
    assert not has_verified_row([], c)
    assert not has_verified_row([{**row, "verified": False}, {**row, "requant": "channel", "verified": True}], c)
    assert has_verified_row([{**row, "verified": True}], c) and has_verified_row([row], c)
