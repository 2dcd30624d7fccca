"""`bnfree sensitivity`: the exact budgeted allocation, the byte count against a real
artifact, one measured entry against an independent numpy computation, bad input."""

import itertools
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from bnfree_jax.pipeline.sensitivity import (CANDIDATE_BITS, allocate, as_rules, cross_entropy,
                                             layer_bytes)
from bnfree_jax.nn.zoo import apply_layer_rules, get_layer_specs, parse_layer_rules
from job_helpers import bnfree


def _table(rng, names):
    return {"layers": {n: {"at": {str(b): {"delta_loss": float(rng.exponential(1.0 / b))}
                                  for b in (1, 2, 4) if rng.random() < 0.9}} for n in names}}


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_exact_optimum(seed):
    """Against brute force over every width combination."""
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(5)]
    shapes = {n: (3, 3, int(rng.integers(1, 9)), int(rng.integers(4, 33))) for n in names}
    table = _table(rng, names)
    per_channel = bool(seed % 2)
    delta = lambda n, b: max(0.0, table["layers"][n]["at"].get(str(b), {"delta_loss": 0.0})["delta_loss"])
    size = lambda widths: sum(layer_bytes(shapes[n], b, per_channel) for n, b in zip(names, widths))
    lo, hi = size([1] * 5), size([8] * 5)
    for budget in np.linspace(lo, hi, 7).astype(int):
        fits = [w for w in itertools.product(CANDIDATE_BITS, repeat=5) if size(w) <= budget]
        best = min(sum(delta(n, b) for n, b in zip(names, w)) for w in fits)
        got = allocate(table, shapes, per_channel, int(budget))
        assert size(list(got.values())) <= budget
        assert sum(delta(n, b) for n, b in got.items()) == pytest.approx(best, abs=1e-12)
    assert allocate(table, shapes, per_channel, lo - 1) is None


def test_rules_group_layers_and_leave_the_logits_activation_alone():
    rules = as_rules({"conv1": 8, "conv2": 1, "conv3": 1, "fc4": 8}, last="fc4")
    assert rules == [("conv1", {"w_bits": 8, "a_bits": 8}), ("fc4", {"w_bits": 8}),
                     ("conv2|conv3", {"w_bits": 1, "a_bits": 1})]


def test_cross_entropy_matches_its_definition():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(6, 4)) * 30, rng.integers(0, 4, 6)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert cross_entropy(z, y) == pytest.approx(-np.mean(np.log(p[np.arange(6), y])), rel=1e-9)


def _student_head(wd):
    """The tiny job's student: the input of its logits layer on the sensitivity images and
    that layer's parameters, read through the job's own loader."""
    import ml_collections

    from bnfree_jax.distill.ptl import final_student
    from bnfree_jax.nn.network import STUDENT
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.pipeline.job import read_pinned
    from bnfree_jax.pipeline.sensitivity import validation_arrays

    ctx = make_context(ml_collections.ConfigDict(read_pinned(wd)), wd, log=lambda m: None)
    params = final_student(ctx.nets, ctx.config.ptl, wd / "ptl")
    (images, labels), split = validation_arrays(ctx, 300)
    net = ctx.nets.network(STUDENT)
    _, trace = net.apply({"params": params}, images, capture=True)
    return np.asarray(trace[-2][0]).reshape(len(images), -1), labels, params[ctx.nets.layer_names[-1]], split


def test_command_measures_proposes_and_counts_the_artifact_bytes(tiny_job_copy):
    wd = tiny_job_copy
    tensors = load_file(str(wd / "export" / "model.safetensors"))
    p = bnfree("sensitivity", "--workdir", str(wd), "--examples", "300", "--budget-bytes", "3000")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[sensitivity] conv1 at 1 bit" in p.stderr  # log prefixes are printed, not read as markup
    out = json.loads((wd / "sensitivity" / "sensitivity.json").read_text())
    assert out["split"] == "train" and out["n_images"] == 300
    assert out["bytes"]["job"] == sum(t.nbytes for t in tensors.values())
    # fc3 (the logits layer) at 1 bit, recomputed in numpy from its input and parameters
    x, labels, head, split = _student_head(wd)
    w = np.asarray(head["kernel"], np.float64)
    wq = np.where(w >= 0, 1.0, -1.0) * np.mean(np.abs(w))
    logits = (x @ wq) * np.asarray(head["alpha"], np.float64) + np.asarray(head["beta"], np.float64)
    assert out["layers"]["fc3"]["at"]["1"]["loss"] == pytest.approx(cross_entropy(logits, labels), rel=1e-4)
    assert out["layers"]["conv1"]["at"]["1"]["delta_loss"] > 0  # a binary first layer costs the job
    assert "4" not in out["layers"]["conv2"]["at"]  # W4A4's own width: not a drop, not measured
    prop = out["proposal"]
    assert prop["bytes"] <= 3000 and set(prop["widths"]) == {"conv1", "conv2", "fc3"}
    assert f"model.layers=\"{prop['rules']!r}\"".replace("(", "[").replace(")", "]") in \
        p.stdout.replace("(", "[").replace(")", "]")
    # the rules, resolved as a job would, give the proposed widths
    specs = apply_layer_rules(get_layer_specs("tiny_cnn", 10, 4, 4, 8), parse_layer_rules(prop["rules"]))
    assert {s.name: s.w_bits for s in specs} == prop["widths"]
    assert all(s.a_bits == (32 if s.last else prop["widths"][s.name]) for s in specs)


def test_bad_input_is_one_line_and_writes_nothing(tiny_job_copy):
    wd = tiny_job_copy
    for args, says in ((["--budget-bytes", "10"], "below the smallest artifact"),
                       (["--examples", "0"], "--examples must be at least 1")):
        p = bnfree("sensitivity", "--workdir", str(wd), *args)
        assert p.returncode == 2, p.stderr[-2000:]
        assert says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (wd / "sensitivity" / "sensitivity.json").exists()
    p = bnfree("sensitivity", "--workdir", str(wd / "nothing"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
