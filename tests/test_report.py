"""The job report: synthetic finished workdirs (random-init models, hand-written ledger,
training log, manifest and sweep) → the report phase (layer statistics measured, then
report.md and its PNGs drawn from the workdir's files); plus the statistics' formulas."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from bnfree_jax.config_io import load_config
from bnfree_jax.distill.plan import build_stage_plan
from bnfree_jax.pipeline import layer_stats as measure
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.pipeline.job import pin_config
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.report_phase import write_report
from bnfree_jax.report import readers
from bnfree_jax.report.layer_stats import LayerInfo, LayerStats, load_layer_stats, save_layer_stats
from bnfree_jax.report.markdown import write_markdown
from bnfree_jax.report.summary import build_summary
from bnfree_jax.train.variables import save_variables

ROOT = Path(__file__).resolve().parents[1]
PNGS = ("scales", "clipping_headroom", "histograms", "layer_loss", "training", "gradients", "accuracy_vs_bits")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TEST = 256


def random_variables(nets, role: str, seed: int) -> dict:
    """Lecun-normal kernels, unit scales, zero biases, act_alpha 4 (fast: no Flax init)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))).astype(s.dtype)
        fill = {"alpha": 1.0, "scale": 1.0, "var": 1.0, "act_alpha": 4.0}.get(name, 0.0)
        return np.full(s.shape, fill, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, measure.abstract_variables(nets, role))


def make_job(workdir: Path, arg: str, *, sweep: bool, manifest: bool):
    """A finished-looking job: pinned config, saved QAT teacher and final student, ledger,
    log, artifact files."""
    config = load_config(str(ROOT / "configs" / "mnist_alexnet.py") + f":{arg}",
                         [f"data.max_train_examples={N_TEST}", f"data.max_test_examples={N_TEST}"])
    ctx = make_context(config, workdir, log=lambda m: None)
    pin_config(config, workdir)
    specs = ctx.nets.specs(quantized=True)
    names = [s.name for s in specs]
    teacher = random_variables(ctx.nets, "teacher", 1)
    save_variables(workdir / "qat" / "variables", teacher)
    student = random_variables(ctx.nets, "student", 2)["params"]
    if "act_alpha" in student[names[1]]:
        student[names[1]]["act_alpha"] = np.asarray(0.01, np.float32)  # force visible clipping
    plan = build_stage_plan(config.ptl, names)
    save_variables(workdir / "ptl" / plan[-1].name, {"S": student, "T": teacher["params"]})

    ledger = Ledger(workdir)
    ledger.mark_done("teacher", top1=0.9812)
    ledger.mark_done("qat", top1=0.9733)
    rng = np.random.default_rng(0)
    log = []
    for k, st in enumerate(plan):
        mse = {n: float(10.0 ** rng.uniform(-4, 0)) for n in names}
        ledger.mark_done(f"ptl/{st.name}", order=k, variant="ptl", name=st.name, kind=st.kind, steps=st.steps,
                         seconds=1.5 + k, metrics={"tandem_top1": 0.9 + 0.005 * k, "layer_mse": mse})
        log += [{"phase": st.name, "step": s, "loss": 2.0 / s} for s in range(1, 11)]
        log[-1].update({f"grad_norm/S/{n}": float(rng.uniform(0.01, 1)) for n in names})  # a log step's diagnostics
        log[-1].update({f"ste_cos/{n}": float(rng.uniform(0.5, 1)) for n in names[:-1]})
    ledger.mark_done("student", top1=0.9655)
    layers = [{"name": n, "acc_bound": 2 ** (12 + i), "headroom_bits": 18 - i, "w_bits": s.w_bits}
              for i, (n, s) in enumerate(zip(names, specs))]
    ledger.mark_done("export", student_fakequant_top1=0.9655, student_int_top1=0.9644, int_argmax_agreement=0.998,
                     int_sim_bit_exact=True, interpreter_float_ops=0, bn_ops_in_artifact=0,
                     min_accumulator_headroom_bits=11)
    for phase in ("teacher", "qat"):
        log += [{"phase": phase, "step": s, "loss": 2.3 * math.exp(-s / 10), "accuracy": 0.5} for s in range(1, 31)]
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    (workdir / "export").mkdir(exist_ok=True)
    (workdir / "export" / "model.safetensors").write_bytes(b"\0" * 12345)
    if manifest:
        (workdir / "export" / "manifest.json").write_text(json.dumps({"layers": layers}))
    if sweep:
        rows = [{"method": m, "w_bits": b, "a_bits": b, "requant": "layer", "seed": s,
                 "top1": 0.9 + 0.01 * b + (0.01 if m == "ptl" else 0) + 0.002 * s}
                for m in ("ptl", "qat_bn", "direct") for b in (1, 2, 4, 8) for s in range(3)]
        (workdir / "sweep").mkdir()
        (workdir / "sweep" / "results.json").write_text(json.dumps(rows))
    return ctx, student


def headline(md: str) -> dict:
    section = md.split("## Headline", 1)[1].split("##", 1)[0]
    return {m.group(1).strip(): m.group(2).strip()
            for m in re.finditer(r"^\| ([^|]+) \| ([^|]+) \|$", section, re.M)}


def figures(md: str) -> list:
    """The PNGs report.md shows, in order."""
    return re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", md)


def float_bytes_from_shapes(nets) -> int:
    """The float teacher's parameter bytes, counted here from its abstract init."""
    import jax.numpy as jnp

    net = nets.network("teacher", quantized=False)
    tree = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, *nets.image_shape), jnp.uint8))
    return int(sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(tree["params"])))


def report_for(workdir: Path, arg: str, *, sweep: bool, manifest: bool):
    """The job's report phase on a synthetic finished workdir."""
    ctx, student = make_job(workdir, arg, sweep=sweep, manifest=manifest)
    summary = write_report(ctx, Ledger(workdir), 42.25)
    return ctx, summary, student, workdir / "report" / "report.md"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    return report_for(tmp_path_factory.mktemp("job_w4a4"), "quick", sweep=True, manifest=True)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_every_figure_is_a_real_png_referenced_by_the_report(full_report):
    _, _, _, path = full_report
    md = path.read_text()
    for name in PNGS:
        png = path.parent / f"{name}.png"
        assert png.exists(), f"{name}.png missing"
        assert png.stat().st_size > 5_000
        w, h = png_size(png)
        assert w >= 500 and h >= 300
        assert f"]({name}.png)" in md
    assert figures(md) == [f"{n}.png" for n in PNGS]
    assert "Not available" not in md
    assert json.loads((path.parent / "summary.json").read_text())["stages"]  # the phase wrote its summary too


def test_report_is_written_from_the_workdirs_files_alone(full_report, tmp_path):
    """A copy of the job's files (no model variables, no dataset read) gives the same report."""
    _, summary, _, path = full_report
    job = path.parent.parent
    files = ["config.json", "phases.json", "metrics.jsonl", "report/layer_stats.json", "report/layer_stats.npz",
             "export/manifest.json", "export/model.safetensors", "sweep/results.json"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(job / f, tmp_path / f)
    assert not (tmp_path / "ptl").exists() and not (tmp_path / "qat").exists()  # nothing to run a network on
    again = build_summary(tmp_path, wall_seconds=42.25, float_params_bytes=summary["float_params_bytes"])
    assert {k: v for k, v in again.items() if k != "written_at"} == \
           {k: v for k, v in summary.items() if k != "written_at"}
    logged = []
    copy = write_markdown(tmp_path, summary, tmp_path / "report", log=logged.append)
    assert copy == tmp_path / "report" / "report.md" and logged == []
    md, original = copy.read_text(), path.read_text()
    assert figures(md) == figures(original) == [f"{n}.png" for n in PNGS]
    for name in PNGS:
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 5_000
    assert md == original  # same summary, same files: the same text, tables included


HEADLINE_KEYS = {  # label in report.md -> summary key, written independently of the module's table
    "teacher top-1 (float, BN)": "teacher_top1",
    "QAT teacher top-1 (BN)": "qat_teacher_top1",
    "student top-1 (fake-quant)": "student_fakequant_top1",
    "student top-1 (integer artifact)": "student_int_top1",
    "integer vs fake-quant argmax agreement": "int_argmax_agreement",
    "integer simulation bit-exact": "int_sim_bit_exact",
    "float ops in the integer interpreter": "interpreter_float_ops",
    "BN ops in the artifact": "bn_ops_in_artifact",
    "artifact tensors (bytes)": "artifact_bytes",
    "float32 parameters (bytes)": "float_params_bytes",
    "min accumulator headroom (bits)": "min_accumulator_headroom_bits",
    "wall time (s)": "wall_seconds",
}


def test_headline_table_equals_summary(full_report):
    ctx, summary, _, path = full_report
    table = headline(path.read_text())
    assert summary["artifact_bytes"] == 12345 and summary["student_int_top1"] == 0.9644
    assert summary["float_params_bytes"] == float_bytes_from_shapes(ctx.nets)
    assert summary["wall_seconds"] == round(42.25, 1)
    for label, key in HEADLINE_KEYS.items():
        got, want = table[label], summary[key]
        if isinstance(want, bool):
            assert got == ("yes" if want else "no")
        elif isinstance(want, int):
            assert int(got) == want, label
        else:
            assert abs(float(got) - want) <= 0.051 if key == "wall_seconds" else abs(float(got) - want) < 5e-5
    ratio = float(table["float / artifact size ratio"].rstrip("×"))
    assert abs(ratio - summary["float_params_bytes"] / 12345) < 0.051


def test_stage_table_lists_every_stage_in_order(full_report):
    ctx, summary, _, path = full_report
    md = path.read_text()
    plan = build_stage_plan(ctx.config.ptl, ctx.nets.layer_names)
    assert [s["name"] for s in summary["stages"]] == [st.name for st in plan]
    section = md.split("## PTL stages", 1)[1].split("##", 1)[0]
    rows = [r.split("|")[1:-1] for r in section.strip().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == [st.name for st in plan]
    for k, (r, st) in enumerate(zip(rows, plan)):
        assert int(r[2]) == st.steps
        assert float(r[3]) == pytest.approx(1.5 + k, abs=0.05)
        assert float(r[4]) == pytest.approx(0.9 + 0.005 * k, abs=5e-5)


def _relu_pooled(pre: np.ndarray, window: int) -> np.ndarray:
    """ReLU then a VALID max-pool of `window` (none for 0), in numpy."""
    x = np.maximum(pre, 0)
    if not window:
        return x
    n, h, w, c = x.shape
    h, w = h // window, w // window
    return x[:, :h * window, :w * window].reshape(n, h, window, w, window, c).max(axis=(2, 4))


def test_layer_table_clipping_matches_a_direct_forward_pass(full_report):
    ctx, _, student, path = full_report
    images, _ = ctx.feed.eval_arrays()
    assert images.shape == (N_TEST, *ctx.nets.image_shape)
    net = ctx.nets.network("student")
    _, trace = jax.jit(lambda p, x: net.apply({"params": p}, x, capture=True))(student, images)
    names = ctx.nets.layer_names
    md = path.read_text()
    assert f"Clipping measured on {N_TEST} test images" in md
    section = md.split("## Layers", 1)[1].split("##", 1)[0]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]]
            for r in section.strip().splitlines()[2:] if r.startswith("|")}
    assert list(rows) == names
    for spec, (_, pre) in zip(ctx.nets.specs(True), trace):  # what the quantizer sees: ReLU, then the pool
        name = spec.name
        alpha = float(student[name]["act_alpha"]) if "act_alpha" in student[name] else None
        clipped = rows[name][6]
        if alpha is None:
            assert clipped == "n/a"
        else:
            seen = _relu_pooled(np.asarray(pre), spec.pool)
            assert clipped == f"{100 * float(np.mean(seen > alpha)):.2f} %", name
    assert float(rows[names[1]][6].rstrip(" %")) > 1.0  # act_alpha 0.01 clips visibly
    assert rows[names[-1]][5] == "n/a"  # logits: no activation step
    assert [int(rows[n][7]) for n in names] == [18 - i for i in range(len(names))]


def test_saved_layer_stats_match_the_students_parameters(full_report):
    """What the report reads (report/layer_stats.*) is the final student's, measured once."""
    ctx, _, student, path = full_report
    stats = load_layer_stats(path.parent)
    specs = ctx.nets.specs(quantized=True)
    assert stats.names == ctx.nets.layer_names and stats.n_probe == N_TEST
    width = lambda b: None if b >= 32 else b  # a float width is None in the file
    assert stats.specs == [LayerInfo(s.name, s.kind, width(s.w_bits), width(s.a_bits), s.last) for s in specs]
    assert stats.specs[-1].a_bits is None and stats.specs[-1].w_bits == 8  # float logits, 8-bit last weights
    want = measure.weight_scales(specs, student, [1 / s for s in ctx.nets.std], ctx.nets.per_channel)
    for got, w in zip(stats.weight_scale, want):
        np.testing.assert_array_equal(got, w)
    assert stats.act_alpha == measure.act_alphas(specs, student)
    assert stats.act_alpha[1] == pytest.approx(0.01) and stats.act_alpha[-1] is None
    assert all(t is not None and t.size > 0 for t in stats.teacher_pre)  # the QAT teacher was found


def test_layer_stats_file_round_trip_keeps_none_and_float_widths(tmp_path):
    infos = [LayerInfo("conv1", "conv", None, 4, False), LayerInfo("fc2", "dense", 8, None, True)]
    stats = LayerStats(names=["conv1", "fc2"], specs=infos, weight_scale=[None, np.array([0.5, 0.25])],
                       act_scale=[0.2, None], act_alpha=[0.6, None], clip_ratio=[0.125, None],
                       student_pre=[np.arange(5, dtype=np.float32), None],
                       teacher_pre=[None, np.ones(3, np.float32)], n_probe=7)
    save_layer_stats(stats, tmp_path)
    back = load_layer_stats(tmp_path)
    assert back.specs == infos and back.names == stats.names and back.n_probe == 7
    assert (back.act_scale, back.act_alpha, back.clip_ratio) == ([0.2, None], [0.6, None], [0.125, None])
    assert back.weight_scale[0] is None and back.student_pre[1] is None and back.teacher_pre[0] is None
    np.testing.assert_array_equal(back.weight_scale[1], [0.5, 0.25])
    np.testing.assert_array_equal(back.student_pre[0], np.arange(5))
    np.testing.assert_array_equal(back.teacher_pre[1], np.ones(3))
    assert load_layer_stats(tmp_path / "nowhere") is None


def test_binary_job_without_sweep_or_artifact(tmp_path):
    """A=1 layers have no clip (n/a); no sweep and no manifest leave gaps, not errors."""
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "accuracy_vs_bits.png").write_bytes(PNG_MAGIC)  # stale, from an earlier report
    ctx, summary, _, path = report_for(tmp_path, "quick,w1a1", sweep=False, manifest=False)
    md = path.read_text()
    out = path.parent
    assert not (out / "accuracy_vs_bits.png").exists()
    assert "accuracy_vs_bits.png" not in md
    assert figures(md) == [f"{n}.png" for n in PNGS[:-1]]
    assert "*Not available: no sweep was run" in md.split("### Accuracy vs bits", 1)[1]
    for name in PNGS[:-1]:
        assert (out / f"{name}.png").exists() and (out / f"{name}.png").stat().st_size > 5_000
        assert f"]({name}.png)" in md
    section = md.split("## Layers", 1)[1].split("##", 1)[0]
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in section.strip().splitlines()[2:] if r.startswith("|")]
    specs = ctx.nets.specs(quantized=True)
    assert len(rows) == len(specs)
    assert all(s.a_bits == 1 for s in specs[:-1])
    assert all(r[5] == "n/a" and r[6] == "n/a" and r[7] == "n/a" for r in rows)  # A=1: no clip; no manifest


def test_clip_ratio_is_the_fraction_strictly_above_alpha():
    pre = np.array([-1.0, 0.5, 1.0, 2.0, 3.0, 1.0000001, 0.0, 7.0])
    assert measure.clip_ratio(pre, 1.0) == 4 / 8
    assert measure.clip_ratio(pre, None) is None


def test_weight_and_activation_scales_follow_their_formulas():
    from bnfree_jax.nn.zoo import get_layer_specs

    specs = get_layer_specs("alexnet_cifar", 10, 4, 2, 8)
    rng = np.random.default_rng(3)
    params = {s.name: {"kernel": rng.standard_normal((3, 3, 3, s.features) if i == 0 else (5, s.features))
                       .astype(np.float32), "act_alpha": np.float32(1.5 + i)}
              for i, s in enumerate(specs)}
    std = [0.5, 0.25, 0.2]
    per_tensor = measure.weight_scales(specs, params, [1 / s for s in std], per_channel=False)
    k0 = params[specs[0].name]["kernel"] / np.asarray(std, np.float32)[:, None]
    assert per_tensor[0].shape == (1,)
    np.testing.assert_allclose(per_tensor[0][0], np.abs(k0).max() / 127, rtol=1e-6)
    np.testing.assert_allclose(per_tensor[1][0], np.abs(params[specs[1].name]["kernel"]).max() / 7, rtol=1e-6)
    per_channel = measure.weight_scales(specs, params, [1 / s for s in std], per_channel=True)
    np.testing.assert_allclose(per_channel[1], np.abs(params[specs[1].name]["kernel"]).max(0) / 7, rtol=1e-6)
    assert per_channel[0].shape == (specs[0].features,)
    alphas = measure.act_alphas(specs, params)
    assert alphas[-1] is None and alphas[0] == 1.5
    steps = measure.act_scales(specs, alphas)
    assert steps[1] == pytest.approx(2.5 / 3) and steps[-1] is None
    binary = get_layer_specs("alexnet_cifar", 10, 1, 1, 8)
    b_scales = measure.weight_scales(binary, params, [1 / s for s in std], per_channel=False)
    np.testing.assert_allclose(b_scales[1][0], np.abs(params[binary[1].name]["kernel"]).mean(), rtol=1e-6)
    assert measure.act_alphas(binary, params)[:-1] == [None] * (len(binary) - 1)


def test_sweep_series_mean_and_sample_std(tmp_path):
    rows = [{"method": "ptl", "w_bits": 2, "a_bits": 2, "requant": "layer", "seed": s, "top1": v}
            for s, v in enumerate([0.90, 0.92, 0.97])]
    rows += [{"method": "ptl", "w_bits": 1, "a_bits": 1, "requant": "layer", "seed": 0, "top1": 0.8},
             {"method": "qat", "w_bits": 2, "a_bits": 2, "requant": "layer", "seed": 0, "top1": None}]
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(rows))
    series = readers.sweep_series(readers.read_sweep(tmp_path))
    assert list(series) == ["ptl"]  # the row without a top-1 is dropped
    (w1, a1, m1, s1, n1), (w2, a2, m2, s2, n2) = series["ptl"]
    assert (w1, a1, m1, s1, n1) == (1, 1, 0.8, 0.0, 1)
    assert (w2, a2, n2) == (2, 2, 3) and m2 == pytest.approx(0.93)
    assert s2 == pytest.approx(math.sqrt(((0.03) ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2))
    assert readers.read_sweep(tmp_path / "nowhere") == []


def test_read_metrics_groups_by_phase_and_keeps_the_last_value_of_a_step(tmp_path):
    lines = ['{"phase": "qat", "step": 2, "loss": 0.5}', "not json",
             '{"phase": "teacher", "step": 1, "loss": 2.0}', '{"phase": "qat", "step": 1, "loss": 0.9}',
             '{"phase": "qat", "step": 2, "loss": 0.4}', '{"phase": "qat", "step": 3, "loss": NaN}',
             '{"phase": "qat", "step": 4}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    got = readers.read_metrics(tmp_path / "m.jsonl")
    assert got == {"qat": ([1, 2], [0.9, 0.4]), "teacher": ([1], [2.0])}
    assert readers.read_metrics(tmp_path / "missing.jsonl") == {}


def test_render_of_a_job_that_stopped_before_export():
    from bnfree_jax.report.markdown import render

    summary = {"model": "m", "dataset": "d", "requant": "layer", "bits": {"w": 2, "a": 2, "first_last_w": 8},
               "teacher_top1": 0.91234, "qat_teacher_top1": None, "student_fakequant_top1": None,
               "student_int_top1": None, "int_argmax_agreement": None, "int_sim_bit_exact": False,
               "interpreter_float_ops": -1, "bn_ops_in_artifact": -1, "artifact_bytes": None,
               "float_params_bytes": 4000, "min_accumulator_headroom_bits": None, "wall_seconds": 3.0,
               "stages": []}
    md = render(summary, {"training": "no data for it in this job"})
    table = headline(md)
    assert table["teacher top-1 (float, BN)"] == "0.9123"
    for label in ("QAT teacher top-1 (BN)", "integer simulation bit-exact", "float ops in the integer interpreter",
                  "BN ops in the artifact", "artifact tensors (bytes)", "float / artifact size ratio"):
        assert table[label] == "n/a", label
    assert ".png" not in md and md.count("*Not available:") == len(PNGS)
    assert "*Not available: no data for it in this job.*" in md
    assert "No distillation stage finished." in md and "## Layers" not in md


def test_the_residual_budget_record_is_no_stage(tmp_path):
    """`ptl/budget` (ptl.stage_budget="residual") sits among the stage records of the
    ledger; the summary lists and times the stages only (the report failed on it with
    KeyError 'name')."""
    from bnfree_jax.report.summary import phase_seconds, ptl_stages

    ledger = {"teacher": {"done": True, "seconds": 5.0},
              "ptl/budget": {"done": True, "residuals": {"conv1": 0.1}, "steps": {"stage1_conv1": 3}},
              "ptl/stage1_conv1": {"done": True, "order": 1, "name": "stage1_conv1", "kind": "tandem", "steps": 3,
                                   "seconds": 2.0, "metrics": {}},
              "ptl/local_init": {"done": True, "order": 0, "name": "local_init", "kind": "local_init", "steps": 2,
                                 "seconds": 1.0, "metrics": {}}}
    assert [r["name"] for r in ptl_stages(ledger)] == ["local_init", "stage1_conv1"]
    assert phase_seconds(ledger) == {"teacher": 5.0, "ptl/local_init": 1.0, "ptl/stage1_conv1": 2.0}
