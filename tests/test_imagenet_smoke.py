"""The ImageNet configuration trains on the imagenet2012 TFDS format at reduced resolution."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_tiny_imagenet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_alexnet_imagenet_config_runs_a_step_on_tiny_imagenet(tmp_path):
    data_dir = tmp_path / "tfds"
    written = write_tiny_imagenet(data_dir)
    wd = tmp_path / "wd"
    p = subprocess.run([sys.executable, "-m", "bnfree_jax.cli", "train-teacher", "--config",
                        "configs/alexnet_imagenet.py:tiny", "--workdir", str(wd),
                        f"data.data_dir='{data_dir}'", "teacher.steps=1"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["phase"] == "teacher" and steps[-1]["step"] == 1
    top1 = json.loads((wd / "phases.json").read_text())["teacher"]["top1"]
    assert top1 == independent_top1(wd, n_val=len(written["validation"]))


def independent_top1(wd: Path, n_val: int) -> float:
    """The saved float teacher's top-1 on the validation images (JPEGs of many sizes, read
    with `Feed.eval_arrays` as export and eval-int read them), by a plain forward pass.

    A teacher of 1000 classes after one step rarely gets any of 7 images right, so the
    pipeline's evaluation is also checked image by image: relabelled with this forward
    pass's own predictions it must score 7/7, and 6/7 with one of them changed."""
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
    images, labels = ctx.feed.eval_arrays()
    assert images.shape == (n_val, 64, 64, 3) and images.dtype == np.uint8  # one shape for all sizes
    net = ctx.nets.network(TEACHER, quantized=False)
    like = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, *ctx.nets.image_shape), jnp.uint8))
    variables = load_variables(wd / "teacher" / "variables", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), like))
    logits = np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, images))
    pred = logits.argmax(-1)
    raw = ctx.feed.eval_source
    assert len({raw[i]["image"].shape for i in range(n_val)}) > 1  # the stored images differ in size
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
