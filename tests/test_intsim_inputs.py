"""Bad inputs to the interpreter (evaluate / run_int / check_images): one ValueError
line each, never a Python internals error or a silent 0 % score."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from int_reference import random_student, reference_run  # noqa: E402

from bnfree_jax.export.artifact import write_artifact  # noqa: E402
from bnfree_jax.intsim import check_images, evaluate, load_artifact, run_int, run_int_with_stats  # noqa: E402

SPECS = [dict(kind="conv", cout=8, k=3, stride=1, padding=[[1, 1], [1, 1]], pool=2), dict(kind="dense", cout=10)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    layers = random_student(rng, imgs, SPECS, [4, 8], [4, 32], [9])
    d = str(tmp_path_factory.mktemp("inputs") / "art")
    write_artifact(d, layers=layers, input_spec={"shape": [8, 8, 1], "pad_value": [9]}, config={}, metrics={})
    return load_artifact(d), imgs, np.argmax(reference_run(d, imgs), axis=1)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    return msg


def test_empty_batch_is_refused_everywhere(setup):
    art, imgs, labels = setup
    empty = imgs[:0]
    for call in (lambda: check_images(art, empty), lambda: run_int(art, empty),
                 lambda: run_int_with_stats(art, empty), lambda: evaluate(art, empty, labels[:0])):
        with pytest.raises(ValueError, match=r"empty batch \(N = 0\)") as info:
            call()
        _one_line(info)


@pytest.mark.parametrize("bs", [0, -1, -6, 2.5, "4", True])
def test_bad_batch_size_is_refused(setup, bs):
    art, imgs, labels = setup
    for call in (lambda: run_int(art, imgs, batch_size=bs), lambda: evaluate(art, imgs, labels, batch_size=bs)):
        with pytest.raises(ValueError, match=r"batch_size must be a positive int or None, got") as info:
            call()
        _one_line(info)


def test_good_batch_sizes_agree(setup):
    art, imgs, labels = setup
    want = np.asarray(run_int(art, imgs))
    for bs in (None, 1, 4, np.int64(5), 6, 100):
        np.testing.assert_array_equal(np.asarray(run_int(art, imgs, batch_size=bs)), want)
    assert evaluate(art, imgs, labels, batch_size=None)["top1"] == 1.0


@pytest.mark.parametrize("bad,match", [
    (lambda y: np.where(np.arange(6) == 2, 10, y), r"labels must lie in \[0, 9\] \(the artifact has 10 classes\), "
                                                  r"got values in \[\d, 10\]"),
    (lambda y: np.where(np.arange(6) == 0, -1, y), r"labels must lie in \[0, 9\].*got values in \[-1, "),
    (lambda y: y + 1000, r"got values in \[100\d, 100\d\]"),
    (lambda y: y[:, None], r"labels must be integers of shape \[6\], got int64 \[6, 1\]"),
    (lambda y: y[:5], r"labels must be integers of shape \[6\], got int64 \[5\]"),
    (lambda y: y.astype(np.float32), r"labels must be integers of shape \[6\], got float32 \[6\]"),
    (lambda y: y > 4, r"labels must be integers of shape \[6\], got bool \[6\]"),
    (lambda y: np.int64(3), r"labels must be integers of shape \[6\], got int64 \[\]"),
])
def test_bad_labels_are_refused(setup, bad, match):
    art, imgs, labels = setup
    with pytest.raises(ValueError, match=match) as info:
        evaluate(art, imgs, bad(labels.astype(np.int64)))
    _one_line(info)


def test_labels_in_range_score_exactly(setup):
    art, imgs, labels = setup
    assert evaluate(art, imgs, labels)["correct"] == 6
    wrong = (labels + 1) % 10
    out = evaluate(art, imgs, list(wrong), batch_size=4)     # a plain list of ints is fine
    assert out["correct"] == 0 and out["n"] == 6 and out["top1"] == 0.0
