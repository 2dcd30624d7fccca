"""Per-layer rules `model.layers`: resolution (first match wins over the uniform defaults),
every refusal as one line, the command-line literal, and pinning of the resolved table."""

from __future__ import annotations

import json

import ml_collections
import pytest

from bnfree_jax.config_io import ConfigError, changed_keys, load_config, to_dict
from bnfree_jax.nn.zoo import FLOAT_BITS, apply_layer_rules, get_layer_specs, layer_table
from bnfree_jax.pipeline.context import quant_specs, record_layer_table
from bnfree_jax.pipeline.job import pin_config
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.validate import config_errors, validate_config
from job_helpers import CONFIG

TINY = ["model.name='tiny_cnn'"]


def _specs(rules, **kw):
    return get_layer_specs("tiny_cnn", 10, kw.get("w", 4), kw.get("a", 4), 8, rules=rules)


def test_first_matching_rule_wins_and_unmatched_fields_keep_their_defaults():
    specs = _specs([("conv1|fc3", {"w_bits": 1}), ("conv.", {"w_bits": 2, "a_bits": 2}),
                    ("conv2", {"w_bits": 8, "act_quantizer": "lsq"})])
    got = [(s.name, s.w_bits, s.a_bits, s.weight_quantizer, s.act_quantizer) for s in specs]
    assert got == [("conv1", 1, 4, "maxabs", "pact"),       # the first rule, not 'conv.'
                   ("conv2", 2, 2, "maxabs", "pact"),       # 'conv.' before 'conv2'
                   ("fc3", 1, FLOAT_BITS, "maxabs", "pact")]  # logits stay float


def test_no_rules_leave_the_uniform_specs_unchanged():
    plain = get_layer_specs("alexnet_mini", 10, 2, 2, 8)
    assert _specs([]) == get_layer_specs("tiny_cnn", 10, 4, 4, 8)
    assert apply_layer_rules(plain, []) == plain
    assert [s.w_bits for s in plain] == [8, 2, 2, 2, 2, 2, 2, 8]


def test_rules_that_are_not_a_list_are_refused():
    with pytest.raises(ValueError, match=r"^model.layers='conv2' must be a list of \(regex, overrides\) pairs$"):
        apply_layer_rules(_specs([]), "conv2")


def test_rules_given_as_json_lists_resolve_as_tuples():
    rules = [("conv2", {"w_bits": 1, "a_bits": 1})]
    assert _specs(json.loads(json.dumps(rules))) == _specs(rules)


@pytest.mark.parametrize("rules,needles", [
    ([("convX", {"w_bits": 8})], ["'convX' matches no layer", "conv1, conv2, fc3"]),
    ([("conv2", {"w_bits": 9})], ["w_bits=9 is outside 1..8"]),
    ([("conv2", {"a_bits": 0})], ["a_bits=0 is outside 1..8"]),
    ([("conv2", {"w_bits": True})], ["w_bits=True is outside 1..8"]),
    ([("conv2", {"bits": 2})], ["override key 'bits' is not one of w_bits, a_bits"]),
    ([("conv2",)], ["must be a (regex, {key: value}) pair"]),
    ([("conv(", {"w_bits": 2})], ["'conv(' is not a regular expression"]),
    ([("conv2", {})], ["'conv2' overrides nothing"]),
    ([("fc3", {"a_bits": 2})], ["sets a_bits but fc3 is the last layer"]),
    ([("conv2", {"weight_quantizer": "nope"})],
     ["layer 'conv2': weight_quantizer='nope' is not a registered weight quantizer (known: ", "maxabs"]),
    ([("conv1", {"act_quantizer": "nope"})], ["act_quantizer='nope' is not a registered activation", "pact"]),
    ([("conv2", {"w_bits": 2, "weight_quantizer": "sign"})],
     ["weight quantizer 'sign' cannot run at 2 bits, the width of layer conv2:", "bits must be 1"]),
])
def test_bad_rules_are_one_line_errors(rules, needles):
    config = load_config(CONFIG, TINY)
    config.model.layers = rules
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_a_binary_only_quantizer_on_the_8_bit_edges_is_refused_before_tracing():
    config = load_config(CONFIG, [*TINY, "model.w_bits=1", "model.weight_quantizer='sign'"])
    errors = config_errors(config)
    assert errors == ["weight quantizer 'sign' cannot run at 8 bits, the width of layers conv1, fc3: "
                      "ValueError: the sign_ste weight quantizer is binary: bits must be 1, got 8 "
                      "(a model.layers rule can choose another quantizer for them)"]
    config.model.layers = [("conv1|fc3", {"weight_quantizer": "maxabs"})]
    assert config_errors(config) == []
    assert [s.weight_quantizer for s in quant_specs(config)] == ["maxabs", "sign", "maxabs"]


def test_command_line_literal_round_trips_through_config_json():
    lit = "model.layers=[('conv1|fc3', {'w_bits': 8}), ('conv2', {'w_bits': 1, 'a_bits': 1})]"
    config = load_config(CONFIG, [*TINY, lit])
    assert config.model.layers == [("conv1|fc3", {"w_bits": 8}), ("conv2", {"w_bits": 1, "a_bits": 1})]
    validate_config(config)
    pinned = ml_collections.ConfigDict(json.loads(json.dumps(to_dict(config))))  # tuples became lists
    validate_config(pinned)
    assert changed_keys(to_dict(config), to_dict(pinned)) == []
    assert quant_specs(pinned) == quant_specs(config)
    with pytest.raises(ConfigError, match="expected list, got str"):
        load_config(CONFIG, [*TINY, "model.layers='conv2'"])


def _pinned(workdir, overrides=()):
    config = load_config(CONFIG, [*TINY, *overrides])
    validate_config(config)
    record_layer_table(config, quant_specs(config))
    pin_config(config, workdir)
    return config


def test_the_table_is_pinned_in_config_json_and_the_ledger_and_a_changed_rule_is_refused(tmp_path):
    rule = "model.layers=[('conv2', {'w_bits': 2, 'a_bits': 2})]"
    config = _pinned(tmp_path, [rule])
    table = json.loads((tmp_path / "config.json").read_text())["model"]["layer_table"]
    assert table == layer_table(quant_specs(config))
    assert table[1] == {"name": "conv2", "w_bits": 2, "a_bits": 2, "weight_quantizer": "maxabs",
                        "act_quantizer": "pact"}
    assert table[2]["act_quantizer"] is None and table[2]["a_bits"] == FLOAT_BITS
    assert Ledger(tmp_path).get("layers") == {"table": table}
    _pinned(tmp_path, [rule])  # the same rule resumes
    with pytest.raises(ConfigError, match=r"changed: model.layer_table, model.layers\); use --force"):
        _pinned(tmp_path, ["model.layers=[('conv2', {'w_bits': 1, 'a_bits': 2})]"])


def test_a_workdir_pinned_before_the_table_existed_still_resumes(tmp_path):
    _pinned(tmp_path)
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    del old["model"]["layer_table"], old["model"]["layers"]  # as pinned before these keys
    path.write_text(json.dumps(old))
    _pinned(tmp_path)
    assert "layer_table" not in json.loads(path.read_text())["model"]  # the pinned file is kept
    with pytest.raises(ConfigError, match=r"changed: model.layers\); use --force"):
        _pinned(tmp_path, ["model.layers=[('conv2', {'w_bits': 2})]"])
