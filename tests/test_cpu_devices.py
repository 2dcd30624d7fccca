"""`mesh.cpu_devices`: a CPU host split into N JAX devices for a job, set before JAX starts,
refused in one line once it cannot be, and recorded with every finished phase."""

import json
import subprocess
import sys

import pytest

from bnfree_jax.config_io import load_config, to_dict
from bnfree_jax.pipeline.job import config_changes
from bnfree_jax.pipeline.validate import config_errors
from bnfree_jax.train.mesh import use_cpu_devices
from job_helpers import CONFIG, ROOT, TINY, bnfree, env

LOAD = ("import jax; from bnfree_jax.pipeline import commands; "
        "c = commands.load_config('configs/mnist_alexnet.py:quick', ['mesh.cpu_devices={n}']); "
        "print(jax.device_count(), len(jax.devices('cpu')))")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)


def test_the_config_sets_the_device_count_before_jax_starts():
    p = python(LOAD.format(n=3))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["3", "3"]


def test_too_late_is_a_clear_error_not_a_silent_default():
    p = python("import jax.numpy as jnp; jnp.zeros(1); " + LOAD.format(n=3))
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "mesh.cpu_devices=3" in last and "already started with 1 CPU device" in last


def test_a_started_jax_with_the_asked_count_is_accepted():
    """XLA_FLAGS already gave JAX 3 CPU devices: asking for 3 after it started is no error."""
    p = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1); " + LOAD.format(n=3)],
                       cwd=ROOT, env={**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["3", "3"]


def test_zero_leaves_jax_alone_and_a_negative_count_is_refused():
    use_cpu_devices(0)  # this process's backends have long started: 0 must not touch them
    with pytest.raises(ValueError, match="mesh.cpu_devices=-2"):
        use_cpu_devices(-2)
    c = load_config(CONFIG, ["mesh.cpu_devices=-1"])
    assert any(e.startswith("mesh.cpu_devices=-1") for e in config_errors(c))


def test_a_workdir_pinned_before_the_key_existed_resumes():
    new = to_dict(load_config(CONFIG))
    old = json.loads(json.dumps(new))
    del old["mesh"]["cpu_devices"]
    assert config_changes(old, new) == []
    new["mesh"]["cpu_devices"] = 4
    assert config_changes(old, new) == ["mesh.cpu_devices"]


def test_a_job_trains_on_the_devices_it_asked_for_and_records_them(tmp_path):
    wd = tmp_path / "wd"
    p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(wd), *TINY, "teacher.steps=8",
               "mesh.cpu_devices=4")
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads((wd / "phases.json").read_text())["teacher"]
    assert record["layout"] == {"platform": "cpu", "devices": 4, "processes": 1}
