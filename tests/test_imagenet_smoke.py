"""The ImageNet configuration trains on the imagenet2012 TFDS format at reduced resolution."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import write_tiny_imagenet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_alexnet_imagenet_config_runs_a_step_on_tiny_imagenet(tmp_path):
    data_dir = tmp_path / "tfds"
    write_tiny_imagenet(data_dir)
    wd = tmp_path / "wd"
    p = subprocess.run([sys.executable, "-m", "bnfree_jax.cli", "train-teacher", "--config",
                        "configs/alexnet_imagenet.py:tiny", "--workdir", str(wd),
                        f"data.data_dir='{data_dir}'", "teacher.steps=1"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["phase"] == "teacher" and steps[-1]["step"] == 1
    top1 = json.loads((wd / "phases.json").read_text())["teacher"]["top1"]
    assert 0.0 <= top1 <= 1.0
