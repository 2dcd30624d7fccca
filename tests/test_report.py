"""The job report: synthetic finished workdirs (random-init models, hand-written ledger,
training log, manifest and sweep) → report.md and its PNGs; plus the statistics' formulas."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax.config_io import load_config
from bnfree_jax.distill.plan import build_stage_plan
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.pipeline.phases import Ledger
from bnfree_jax.pipeline.variables import save_variables
from bnfree_jax.report import probe, sources
from bnfree_jax.report.markdown import write_markdown
from bnfree_jax.report.summary import build_summary

ROOT = Path(__file__).resolve().parents[1]
PNGS = ("scales", "clipping_headroom", "histograms", "layer_loss", "training", "accuracy_vs_bits")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _init(net, shape, seed):
    return jax.device_get(net.init(jax.random.PRNGKey(seed), jnp.zeros((1, *shape), jnp.uint8)))


def make_job(workdir: Path, arg: str, *, sweep: bool, manifest: bool):
    """A finished-looking job: saved QAT teacher and final student, ledger, log, artifact files."""
    config = load_config(str(ROOT / "configs" / "mnist_alexnet.py") + f":{arg}",
                         ["data.max_train_examples=256", "data.max_test_examples=256"])
    ctx = make_context(config, workdir, log=lambda m: None)
    specs = ctx.specs(quantized=True)
    names = [s.name for s in specs]
    teacher = _init(ctx.network("teacher"), ctx.info.image_shape, 1)
    save_variables(workdir / "qat" / "variables", teacher)
    student = jax.tree.map(np.asarray, _init(ctx.network("student"), ctx.info.image_shape, 2)["params"])
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
    summary = build_summary(ctx, Ledger(workdir), 42.25)
    return ctx, summary, student


def headline(md: str) -> dict:
    section = md.split("## Headline", 1)[1].split("##", 1)[0]
    return {m.group(1).strip(): m.group(2).strip()
            for m in re.finditer(r"^\| ([^|]+) \| ([^|]+) \|$", section, re.M)}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    wd = tmp_path_factory.mktemp("job_w4a4")
    ctx, summary, student = make_job(wd, "quick", sweep=True, manifest=True)
    path = write_markdown(ctx, summary, wd / "report")
    return ctx, summary, student, path
