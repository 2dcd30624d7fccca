"""`model.bias_grid`: the student trains with β on the artifact's accumulator grid, so its
fake-quant forward is the integer artifact's up to float rounding. The layer-level bounds
are in test_integerize.py; here a whole W2A2 job, where a float β costs agreement."""

import json

import pytest

from job_helpers import CONFIG, TINY, bnfree

from bnfree_jax.config_io import load_config
from bnfree_jax.nn.network import STUDENT
from bnfree_jax.pipeline.context import make_context


def test_the_key_reaches_every_network(tmp_path):
    on = make_context(load_config(CONFIG, TINY + ["model.bias_grid=True"]), tmp_path / "on", log=lambda m: None)
    off = make_context(load_config(CONFIG, TINY), tmp_path / "off", log=lambda m: None)
    assert on.nets.network(STUDENT).bias_grid is True and off.nets.network(STUDENT).bias_grid is False


@pytest.mark.slow
def test_a_w2a2_job_on_the_grid_predicts_as_its_artifact(tmp_path):
    wd = tmp_path / "wd"
    p = bnfree("run", "--config", CONFIG, "--workdir", str(wd), *TINY, "model.w_bits=2", "model.a_bits=2",
               "model.bias_grid=True")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((wd / "report" / "summary.json").read_text())
    assert s["bits"]["w"] == 2 and s["int_sim_bit_exact"] is True
    assert s["student_int_top1"] > 0.5  # trained, not chance
    # 512 test images: at most one argmax decided by float noise at a rounding tie
    assert s["int_argmax_agreement"] >= 511 / 512, s["int_argmax_agreement"]
    assert abs(s["student_int_top1"] - s["student_fakequant_top1"]) <= 1 / 512
