"""ImageNet end to end as a pod user runs it, on a miniature ILSVRC2012 (real wnids, CMYK,
PNG-named-JPEG and grayscale files, images of many sizes): `bnfree prepare imagenet2012`,
`bnfree run --config configs/alexnet_imagenet.py:tiny`, then `bnfree eval-int` on the
validation split; one job shared by the tests of this file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import imagenet_miniature, write_imagenet_extracted
from job_helpers import artifact_sha, bnfree

CONFIG = "configs/alexnet_imagenet.py:tiny"
RESIZE = 40  # shorter side after prepare: every image a different width, decoding cheap
PHASES = ["teacher", "qat", "ptl/local_init", "ptl/stage1_conv1-fc8",
          "student", "export", "report"]


@pytest.fixture(scope="module")
def imagenet_job(tmp_path_factory):
    """(workdir, data dir) of a finished tiny ImageNet job (do not modify them)."""
    tmp = tmp_path_factory.mktemp("imagenet_job")
    src, data_dir, wd = write_imagenet_extracted(tmp / "src"), tmp / "tfds", tmp / "wd"
    p = bnfree("prepare", "imagenet2012", "--source", str(src), "--data-dir", str(data_dir),
               "--resize", str(RESIZE), "--workers", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    # checkpoints at the phases' ends only: the 1000-class AlexNet's state is ~300 MB a save
    p = bnfree("run", "--config", CONFIG, "--workdir", str(wd), f"data.data_dir={data_dir}",
               "checkpoint.save_every=1000")
    assert p.returncode == 0, p.stderr[-3000:]
    yield wd, data_dir
    shutil.rmtree(tmp)  # 2 GB of AlexNet checkpoints: not left in pytest's kept temp dirs


@pytest.mark.slow
def test_every_phase_done_export_bit_exact_report_written(imagenet_job):
    wd, _ = imagenet_job
    ledger = json.loads((wd / "phases.json").read_text())
    layers = ledger.pop("layers")  # the resolved per-layer table: a record, not a phase
    assert [t["name"] for t in layers["table"]][0] == "conv1" and layers["table"][-1]["a_bits"] == 32, layers
    assert sorted(ledger) == sorted(PHASES) and all(ledger[k]["done"] is True for k in PHASES), ledger
    export = ledger["export"]
    manifest = json.loads((wd / "export" / "manifest.json").read_text())
    assert manifest["config"]["data"]["name"] == "imagenet2012"
    for key in ("student_fakequant_top1", "student_int_top1", "int_argmax_agreement", "int_sim_bit_exact"):
        assert manifest["metrics"][key] == export[key], key
    assert export["int_sim_bit_exact"] is True and manifest["metrics"]["interpreter_float_ops"] == 0
    assert export["sha256"]["model.safetensors"] == artifact_sha(wd)
    summary = json.loads((wd / "report" / "summary.json").read_text())
    assert (summary["dataset"], summary["eval_split"], summary["int_sim_bit_exact"]) == ("imagenet2012", "test", True)
    assert summary["student_int_top1"] == export["student_int_top1"] and summary["bn_ops_in_artifact"] == 0
    assert "imagenet2012" in (wd / "report" / "report.md").read_text()


@pytest.mark.slow
def test_eval_int_on_the_validation_split_repeats_the_jobs_integer_accuracy(imagenet_job, tmp_path):
    wd, data_dir = imagenet_job
    out = tmp_path / "eval_int.json"
    p = bnfree("eval-int", "--artifact", str(wd / "export"), "--split", "test", "--data-dir", str(data_dir),
               "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    export = json.loads((wd / "phases.json").read_text())["export"]
    assert got["n"] == len(imagenet_miniature()["validation"]) and got["interpreter_float_ops"] == 0
    assert got["top1"] == export["student_int_top1"]
    # The largest accumulator of every layer, a fingerprint of the very pixels: another
    # crop, resize or colour conversion of any image than the export's changes it.
    assert got["max_abs_acc"] == export["max_abs_acc"]
    assert got["recorded_at_export"]["split"] == "test"


@pytest.mark.slow
def test_the_teachers_top1_is_that_of_a_plain_forward_pass(imagenet_job):
    wd, _ = imagenet_job
    n_val = len(imagenet_miniature()["validation"])
    top1 = json.loads((wd / "phases.json").read_text())["teacher"]["top1"]
    assert top1 == independent_top1(wd, n_val)


def independent_top1(wd: Path, n_val: int) -> float:
    """The saved float teacher's top-1 on the validation images (stored at many sizes, read
    with `Feed.eval_arrays` as export and eval-int read them), by a plain forward pass.

    A teacher of 1000 classes after a few steps rarely gets any of 8 images right, so the
    pipeline's evaluation is also checked image by image: relabelled with this forward
    pass's own predictions it must score 8/8, and 7/8 with one of them changed."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from bnfree_jax.nn.network import TEACHER
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.train.evaluate import evaluate_top1
    from bnfree_jax.train.feed import Feed
    from bnfree_jax.train.variables import load_variables

    config = ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))
    ctx = make_context(config, wd, log=lambda m: None)
    size = config.data.image_size
    images, labels = ctx.feed.eval_arrays()
    assert images.shape == (n_val, size, size, 3) and images.dtype == np.uint8  # one shape for all sizes
    raw = ctx.feed.eval_source
    assert len({raw[i]["image"].shape for i in range(n_val)}) > 1  # the stored images differ in size
    net = ctx.nets.network(TEACHER, quantized=False)
    like = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, *ctx.nets.image_shape), jnp.uint8))
    variables = load_variables(wd / "teacher" / "variables", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), like))
    logits = np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, images))
    pred = logits.argmax(-1)
    apply_fn = lambda p, ms, fr, x: net.apply({"params": p, **ms}, x, train=False)
    for wrong, want in ((None, 1.0), (3, (n_val - 1) / n_val)):
        relabelled = [{"image": raw[i]["image"], "label": np.int32((pred[i] + (i == wrong)) % 1000)}
                      for i in range(n_val)]
        feed = Feed(train_source=None, eval_source=relabelled, image_size=ctx.feed.image_size,
                    eval_batch=ctx.feed.eval_batch)
        got = evaluate_top1(apply_fn, variables["params"], {"batch_stats": variables["batch_stats"]}, {},
                            feed, ctx.rt.mesh)
        assert got == want, (wrong, got)
    return int(np.sum(pred == labels)) / n_val
