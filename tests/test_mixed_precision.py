"""Mixed precision everywhere: a W1/W2/W8 mix of per-layer rules (binary layers feeding
multi-bit ones and the reverse) trained end to end by `bnfree run` into ONE artifact that
the interpreter reproduces bit-exactly, the per-layer table in config.json, the manifest,
the ledger and the report, and the ONNX graph of the mix matching the interpreter."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from bnfree_jax.export.artifact import write_artifact
from bnfree_jax.export.integerize import integerize
from bnfree_jax.export.simulate import int_sim_logits
from bnfree_jax.intsim import load_artifact, run_int
from bnfree_jax.nn.network import STUDENT, make_network
from bnfree_jax.nn.zoo import get_layer_specs, layer_table
from job_helpers import bnfree, last_line, run_args

# conv1 8-bit weights, 2-bit output -> conv2 1-bit weights on 2-bit codes (int8 path), sign
# output -> fc3 2-bit weights on +-1 codes.
MIX = [("conv1", {"w_bits": 8, "a_bits": 2}), ("conv2", {"w_bits": 1, "a_bits": 1}), ("fc3", {"w_bits": 2})]
RULE = f"model.layers={MIX!r}"
TABLE = [{"name": "conv1", "w_bits": 8, "a_bits": 2, "weight_quantizer": "maxabs", "act_quantizer": "pact"},
         {"name": "conv2", "w_bits": 1, "a_bits": 1, "weight_quantizer": "maxabs", "act_quantizer": "pact"},
         {"name": "fc3", "w_bits": 2, "a_bits": 32, "weight_quantizer": "maxabs", "act_quantizer": None}]


@pytest.fixture(scope="module")
def mixed_job(tmp_path_factory):
    wd = tmp_path_factory.mktemp("mixed") / "wd"
    p = bnfree(*run_args(wd), RULE)
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


@pytest.mark.slow
def test_mixed_job_exports_one_bit_exact_artifact_with_its_table(mixed_job):
    manifest = json.loads((mixed_job / "export" / "manifest.json").read_text())
    assert json.loads((mixed_job / "config.json").read_text())["model"]["layer_table"] == TABLE
    assert manifest["config"]["model"]["layer_table"] == TABLE
    assert json.loads((mixed_job / "phases.json").read_text())["layers"] == {"table": TABLE}
    assert [(l["w_bits"], l["a_bits"], l["output"]) for l in manifest["layers"]] == \
        [(8, 2, "requant_relu"), (1, 1, "sign"), (2, 32, "requant_out")]
    m = manifest["metrics"]
    assert m["int_sim_bit_exact"] is True and m["interpreter_float_ops"] == 0
    assert m["int_argmax_agreement"] >= 0.9 and m["student_int_top1"] > 0.3  # trained, not chance
    art = load_artifact(mixed_job / "export")
    assert [(l.binary, l.in_max) for l in art.layers] == [(False, 255), (False, 3), (False, 1)]
    summary = json.loads((mixed_job / "report" / "summary.json").read_text())
    assert summary["layers"] == TABLE and summary["layer_rules"] == json.loads(json.dumps(MIX))
    report = (mixed_job / "report" / "report.md").read_text()
    assert "mixed-precision student" in report and "## Precision per layer" in report
    assert "| conv2 | 1 | 1 | maxabs | pact |" in report and "| fc3 | 2 | logits | maxabs | n/a |" in report


@pytest.mark.slow
def test_mixed_artifact_onnx_matches_the_interpreter(mixed_job, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from bnfree_jax.export.onnx_export import artifact_to_onnx

    art = load_artifact(mixed_job / "export")
    imgs = np.random.default_rng(0).integers(0, 256, (64, *art.input_shape), dtype=np.uint8)
    artifact_to_onnx(mixed_job / "export", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"images": imgs})[0]
    want = np.asarray(run_int(art, imgs))
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 20  # not a constant output


@pytest.mark.slow
def test_a_changed_rule_is_refused_on_rerun(mixed_job):
    other = f"model.layers={[MIX[0], ('conv2', {'w_bits': 2, 'a_bits': 1}), MIX[2]]!r}"
    p = bnfree(*run_args(mixed_job), other)
    assert p.returncode == 2 and "changed: model.layer_table, model.layers" in last_line(p), p.stderr[-2000:]


@pytest.mark.parametrize("rules,binary", [
    # a binary XNOR layer (1-bit weights on signs) feeding 4-bit codes into an 8-bit layer
    ([("conv1", {"w_bits": 8, "a_bits": 1}), ("conv2", {"w_bits": 1, "a_bits": 4}), ("fc3", {"w_bits": 8})],
     [False, True, False]),
    # 8-bit activations (offset int8 path) into a 1-bit-weight layer, signs into a binary head
    ([("conv1", {"w_bits": 2, "a_bits": 8}), ("conv2", {"w_bits": 1, "a_bits": 1}), ("fc3", {"w_bits": 1})],
     [False, False, True]),
])
def test_any_mix_integerizes_to_an_artifact_the_interpreter_runs_exactly(tmp_path, rules, binary):
    specs = get_layer_specs("tiny_cnn", 10, 4, 4, 8, rules=rules)
    net = make_network(specs, STUDENT, [0.5], [0.25])
    imgs = np.random.default_rng(1).integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
    params = jax.device_get(net.init(jax.random.key(0), imgs[:1])["params"])
    for name in ("conv1", "conv2"):  # codes spread over the grid, signs of both kinds
        params[name]["beta"] = np.linspace(-0.5, 0.5, params[name]["beta"].size).astype(np.float32)
    layers, spec = integerize(specs, params, [0.5], [0.25], (28, 28, 1), per_channel=False)
    write_artifact(tmp_path, layers=layers, input_spec=spec, config={"model": {"layer_table": layer_table(specs)}},
                   metrics={})
    art = load_artifact(tmp_path)
    assert [l.binary for l in art.layers] == binary
    got = np.asarray(run_int(art, imgs))
    np.testing.assert_array_equal(got, int_sim_logits(layers, spec, imgs))
    assert len(np.unique(got)) > 10
