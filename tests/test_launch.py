"""Launch scripts (dry runs, syntax), the ImageNet config's shape, and the pure
environment detection of bnfree_jax.train.distributed."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bnfree_jax.train import distributed
from bnfree_jax.config_io import flatten, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["local.sh", "multiprocess_cpu.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]
BARE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp/bnfree_home", "PYTHON": "python3"}


def _dry(script: str, *args: str) -> list[str]:
    res = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=BARE_ENV,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines and not res.stderr.strip(), (res.stdout, res.stderr)
    return lines


def _is_bnfree(words: list[str]) -> bool:
    return "bnfree" in words or any(w == "bnfree_jax.cli" and words[i - 1] == "-m"
                                    for i, w in enumerate(words))


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_local_dry_run():
    (line,) = _dry("local.sh", "--dry-run", "train-teacher", "--workdir", "/tmp/w a", "teacher.steps=3")
    words = shlex.split(line)
    assert _is_bnfree(words)
    assert words[-4:] == ["train-teacher", "--workdir", "/tmp/w a", "teacher.steps=3"]
    assert "--distributed" not in words


@pytest.mark.parametrize("n,k", [(2, 2), (3, 1)])
def test_multiprocess_dry_run(n, k):
    lines = _dry("multiprocess_cpu.sh", str(n), "--devices-per-process", str(k), "--dry-run", "--",
                 "train-teacher", "--workdir", "/tmp/j")
    assert len(lines) == n
    coordinators = set()
    for i, line in enumerate(lines):
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())
        assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={k}"
        assert env["BNFREE_NUM_PROCESSES"] == str(n) and env["BNFREE_PROCESS_ID"] == str(i)
        coordinators.add(env["BNFREE_COORDINATOR"])
        assert _is_bnfree(words)
        cli = words.index("bnfree_jax.cli") if "bnfree_jax.cli" in words else words.index("bnfree")
        assert words[cli + 1:] == ["--distributed", "train-teacher", "--workdir", "/tmp/j"]
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")


def test_multiprocess_rejects_bad_usage():
    res = subprocess.run(["bash", str(ROOT / "launch" / "multiprocess_cpu.sh"), "zero", "--", "run"],
                         env=BARE_ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_tpu_dry_run():
    env = dict(BARE_ENV, TPU_NAME="pod1", ZONE="us-central2-b", BUCKET="gs://bkt")
    res = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--dry-run", "--", "run",
                          "--config", "configs/alexnet_imagenet.py:w2a2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    create = [l for l in lines if "tpu-vm create" in l]
    assert len(create) == 1 and "tpu-vm describe pod1" in create[0]
    assert "--accelerator-type v4-32" in create[0]
    train = [shlex.split(l) for l in lines if "bnfree_jax.cli" in l and "--distributed" in l]
    assert len(train) == 1
    words = train[0]
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in words
    remote = shlex.split(words[words.index("--command") + 1].replace("~", "HOME"))
    assert _is_bnfree(remote) and "--distributed" in remote
    assert remote[remote.index("run"):][:3] == ["run", "--config", "configs/alexnet_imagenet.py:w2a2"]
    assert any("gcsfuse" in l and "bkt" in l and "--worker=all" in l for l in lines)
    assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)


def test_slurm_dry_run():
    (line,) = _dry("slurm_gpu.sbatch", "--dry-run", "--", "train-teacher", "--workdir", "/shared/j")
    words = shlex.split(line)
    assert words[0] == "srun" and "--kill-on-bad-exit=1" in words
    assert _is_bnfree(words) and words[-4:] == ["--distributed", "train-teacher", "--workdir", "/shared/j"]


def _keys_and_types(config) -> dict:
    return {k: type(v).__name__ for k, v in flatten(to_dict(config)).items()}


@pytest.mark.parametrize("arg", ["", "tiny", "w2a2", "w1a1", "channel", "w2a2,channel", "tiny,w1a1"])
def test_imagenet_config_matches_mnist_structure(arg):
    ref = _keys_and_types(load_config("configs/mnist_alexnet.py"))
    spec = "configs/alexnet_imagenet.py" + (f":{arg}" if arg else "")
    c = load_config(spec, ["data.data_dir=gs://b/tfds"])
    assert _keys_and_types(c) == ref
    assert c.model.name == "alexnet" and c.model.num_classes == 1000
    assert c.data.name == "imagenet2012" and c.data.augment == "imagenet"
    assert c.data.data_dir == "gs://b/tfds"
    assert c.model.first_last_w_bits == 8
    parts = arg.split(",")
    expect_bits = (2, 2) if "w2a2" in parts else (1, 1) if "w1a1" in parts else (4, 4)
    assert (c.model.w_bits, c.model.a_bits) == expect_bits
    assert c.model.requant == ("channel" if "channel" in arg else "layer")
    if "tiny" in arg:
        assert c.data.image_size == 64 and c.teacher.steps <= 10
    else:
        assert c.data.image_size == 224 and c.teacher.optim.name == "sgd"
        assert c.teacher.batch == 1024 and c.teacher.batch % 16 == 0
        assert c.teacher.steps == 90 * (1_281_167 // 1024)


def test_imagenet_config_rejects_unknown_argument():
    from bnfree_jax.config_io import ConfigError
    with pytest.raises(ConfigError):
        load_config("configs/alexnet_imagenet.py:w4a4,huge")


@pytest.mark.parametrize("nodelist,host", [
    ("node01", "node01"), ("node01,node02", "node01"), ("node[01-04]", "node01"),
    ("gpu[3,5-7]", "gpu3"), ("a[01-02],b[1-3]", "a01"), ("rack1-n[009-012]", "rack1-n009")])
def test_first_host(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_plan_explicit_env():
    plan = distributed.plan_from_env({"BNFREE_COORDINATOR": "127.0.0.1:5000", "BNFREE_NUM_PROCESSES": "2",
                                      "BNFREE_PROCESS_ID": "1", "BNFREE_LOCAL_DEVICE_IDS": "0,1",
                                      "SLURM_PROCID": "3", "SLURM_NTASKS": "8"})
    assert plan["source"] == "env" and plan["cpu_collectives"] == "gloo"
    kw = plan["kwargs"]
    assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == ("127.0.0.1:5000", 2, 1)
    assert kw["local_device_ids"] == [0, 1]
    assert kw["initialization_timeout"] == 120 and kw["heartbeat_timeout_seconds"] == 120
    with pytest.raises(ValueError):
        distributed.plan_from_env({"BNFREE_COORDINATOR": "h:1", "BNFREE_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError):
        distributed.plan_from_env({"BNFREE_COORDINATOR": "h:1", "BNFREE_NUM_PROCESSES": "2",
                                   "BNFREE_PROCESS_ID": "2"})


def test_plan_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "BNFREE_PORT": "2222"}
    kw = distributed.plan_from_env(env)["kwargs"]
    assert kw["coordinator_address"] == "gpu07:2222"
    assert (kw["num_processes"], kw["process_id"], kw["local_device_ids"]) == (16, 5, [5])
    env.pop("BNFREE_PORT")
    assert distributed.plan_from_env(env)["kwargs"]["coordinator_address"] == "gpu07:12355"
    # A one-task allocation is a single process.
    assert distributed.plan_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})["source"] == "single"


@pytest.mark.parametrize("env,source", [
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v4-32"}, "tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v4-8"}, "single"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single"),
    ({}, "single")])
def test_plan_tpu_and_single(env, source):
    plan = distributed.plan_from_env(env)
    assert plan["source"] == source
    if source == "tpu":  # auto-detection: no address or ids of ours
        assert set(plan["kwargs"]) == {"initialization_timeout", "heartbeat_timeout_seconds"}


def test_initialize_single_process_is_a_noop_and_idempotent():
    code = ("import json; from bnfree_jax.train.distributed import initialize; "
            "a = initialize({}); b = initialize({}); print(json.dumps([a, b]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
                         timeout=120)
    assert res.returncode == 0, res.stderr
    a, b = json.loads(res.stdout.strip().splitlines()[-1])
    assert a == b
    assert a["source"] == "single" and a["process_count"] == 1 and a["process_index"] == 0


def _as_process(monkeypatch, index: int, at_barrier) -> list[str]:
    """Pose as process `index` of 2; `at_barrier()` runs where the peers would meet."""
    import jax
    from jax.experimental import multihost_utils

    events: list[str] = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: index)

    def barrier(name):
        events.append(f"barrier {name}")
        at_barrier()

    monkeypatch.setattr(multihost_utils, "sync_global_devices", barrier)
    return events


@pytest.mark.parametrize("index, order", [(0, ["work", "barrier b"]), (1, ["barrier b", "work"])])
def test_primary_first_orders_the_work_around_the_barrier(monkeypatch, index, order):
    events = _as_process(monkeypatch, index, lambda: None)
    assert distributed.primary_first(lambda: events.append("work") or 7, "b") == 7
    assert events == order


def test_primary_first_meets_the_barrier_when_the_primary_fails(monkeypatch):
    events = _as_process(monkeypatch, 0, lambda: None)
    with pytest.raises(RuntimeError, match="boom"):
        distributed.primary_first(lambda: (_ for _ in ()).throw(RuntimeError("boom")), "b")
    assert events == ["barrier b"]


def test_a_peer_checks_the_pinned_config_only_once_process_0_wrote_it(monkeypatch, tmp_path):
    """Process 0 truncates and fills config.json while a peer may look: the peer must read
    it after the barrier, never the half-written file."""
    from bnfree_jax.config_io import ConfigError
    from bnfree_jax.pipeline.job import pin_config

    config = load_config(str(ROOT / "configs" / "mnist_alexnet.py:quick"))
    path = tmp_path / "config.json"
    path.write_text("")  # process 0 has opened the file and not yet written it
    _as_process(monkeypatch, 1, lambda: path.write_text(json.dumps(to_dict(config))))
    pin_config(config, tmp_path)  # reads after the barrier: the complete file, which matches
    other = load_config(str(ROOT / "configs" / "mnist_alexnet.py:quick"), ["seed=5"])
    with pytest.raises(ConfigError, match="seed"):
        pin_config(other, tmp_path)
