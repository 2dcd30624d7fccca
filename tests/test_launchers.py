"""The launchers a pod user relies on: KEY=VALUE overrides on both sides of the CLI's options,
each launcher passing the user's overrides through to a command line the CLI accepts, the
TPU launcher's install / stale-process kill / detached per-worker logs / stop-all supervisor,
and the SLURM script's job-derived port and requeue on preemption.  No gcloud, srun or TPU:
dry runs, the supervisor run for real on local commands, and fake srun/scontrol."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnfree_jax import cli
from bnfree_jax.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CONFIG = "configs/mnist_alexnet.py:quick"
USER = ["model.w_bits=2", "model.requant='channel'", "ptl.stage_steps=7"]  # a quoted value too


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH dir whose gcloud/srun/scontrol record their calls (a launcher test never
    reaches the real tools); returns (dir, calls file)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("gcloud", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    # srun: records its port and arguments, then runs until SIGTERM (which it records too).
    (bin_dir / "srun").write_text(
        f'#!/usr/bin/env bash\necho "srun BNFREE_PORT=$BNFREE_PORT $*" >> {calls}\n'
        f'[ -n "$FAKE_SRUN_EXIT" ] && exit "$FAKE_SRUN_EXIT"\n'
        f"trap 'kill $s 2>/dev/null; echo \"srun got TERM\" >> {calls}; exit 143' TERM\n"
        "sleep 30 & s=$!\nwait $s\n")
    (bin_dir / "srun").chmod(0o755)
    return bin_dir, calls


def _env(bin_dir: Path, **extra) -> dict:
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/tmp/bnfree_home", **extra}


def _script(script: str, *args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _dry(script: str, *args: str, env: dict) -> list[str]:
    res = _script(script, *args, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()


def _bnfree_args(words: list[str]) -> list[str]:
    """The arguments of the bnfree command in a command line's words (up to a redirection)."""
    start = words.index("bnfree_jax.cli") + 1
    end = next((i for i in range(start, len(words)) if words[i] in (">", ">>", "&", ";")), len(words))
    args = words[start:end]
    return args[1:] if args[:1] == ["--distributed"] else args


def _accepted(words: list[str]):
    """The namespace the real CLI parser makes of a launcher's bnfree command."""
    return cli.parse_args(_bnfree_args(words))


# ---- the CLI: overrides before and after the options ----

@pytest.mark.parametrize("argv,overrides", [
    (["run", "--config", "C", "a.b=1", "--workdir", "D", "c=2"], ["a.b=1", "c=2"]),
    (["run", "a=1", "--config", "C", "b=2", "--workdir", "D", "c=3", "--force", "d=4"],
     ["a=1", "b=2", "c=3", "d=4"]),
    (["distill", "--dry-run", "--workdir", "D", "a=1", "--config", "C", "a=2"], ["a=1", "a=2"]),
    (["sweep", "--config", "C", "--workdir", "D", "a=1", "b=2"], ["a=1", "b=2"]),
    (["train-teacher", "--workdir", "D", "--qat"], []),
])
def test_overrides_on_both_sides_of_the_options(argv, overrides):
    args = cli.parse_args(argv)
    assert args.overrides == overrides  # in command-line order: a later one wins
    assert args.workdir == "D"
    if "--config" in argv:
        assert args.config == "C"
    if "--force" in argv:
        assert args.force


@pytest.mark.parametrize("argv,stray", [
    (["run", "--workdir", "D", "a=1", "stray"], "stray"),
    (["run", "stray", "--workdir", "D", "a=1"], "stray"),
    (["run", "--workdir", "D", "a=1", "--bogus"], "--bogus"),
    (["run", "--workdir", "D", "=1"], "=1"),
    (["export", "--workdir", "D", "a=1"], "a=1"),  # export takes no overrides
])
def test_a_stray_argument_is_one_line_and_status_2(argv, stray, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and stray in err[0] and "KEY=VALUE" in err[0], err


def _expected_total(overrides: list[str]) -> int:
    from bnfree_jax.distill.plan import build_stage_plan, total_steps
    from bnfree_jax.nn.zoo import get_layer_specs

    c = load_config(str(ROOT / CONFIG), overrides)
    return total_steps(build_stage_plan(c.ptl, [s.name for s in get_layer_specs(c.model.name,
                                                                                 c.model.num_classes)]))


def _totals(output: str) -> list[int]:
    return [int(line.rsplit(":", 1)[1]) for line in output.splitlines()
            if "total distillation steps:" in line]


def test_real_cli_applies_overrides_after_the_workdir(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bnfree_jax.cli", "distill", "--dry-run", "--config", CONFIG,
                        "ptl.stage_steps=7", "--workdir", str(tmp_path / "x"), "ptl.finetune_steps=3"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    expected = _expected_total(["ptl.stage_steps=7", "ptl.finetune_steps=3"])
    assert expected != _expected_total(["ptl.stage_steps=7"])  # the later override changes it
    assert _totals(p.stdout) == [expected]


# ---- local.sh and multiprocess_cpu.sh ----

def test_local_dry_run_passes_overrides_in_any_position(fake_bin):
    args = ["run", USER[0], "--config", CONFIG, USER[1], "--workdir", "/tmp/w a", USER[2]]
    (line,) = _dry("local.sh", "--dry-run", *args, env=_env(fake_bin[0], PYTHON="python3"))
    words = shlex.split(line)
    assert _bnfree_args(words) == args  # verbatim
    parsed = _accepted(words)
    assert parsed.overrides == USER and parsed.workdir == "/tmp/w a"


def test_multiprocess_dry_run_passes_overrides_in_any_position(fake_bin):
    args = ["distill", "--config", CONFIG, USER[0], "--workdir", "/tmp/j", USER[1], USER[2]]
    lines = _dry("multiprocess_cpu.sh", "2", "--dry-run", "--", *args, env=_env(fake_bin[0], PYTHON="python3"))
    assert len(lines) == 2
    for line in lines:
        words = shlex.split(line)
        assert _bnfree_args(words) == args
        assert _accepted(words).overrides == USER


def test_multiprocess_launcher_really_passes_overrides_after_the_workdir(tmp_path):
    """Two real processes (jax.distributed over gloo) each parse and apply the overrides."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable}
    res = _script("multiprocess_cpu.sh", "2", "--", "distill", "--dry-run", "--config", CONFIG,
                  "ptl.stage_steps=7", "--workdir", str(tmp_path / "x"), "ptl.finetune_steps=3",
                  env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _expected_total(["ptl.stage_steps=7", "ptl.finetune_steps=3"])
    lines = [l for l in res.stdout.splitlines() if "total distillation steps:" in l]
    assert sorted(l.split(" ", 1)[0] for l in lines) == ["[p0]", "[p1]"]
    assert _totals(res.stdout) == [expected, expected]


# ---- tpu_pod.sh ----

TPU_ENV = dict(TPU_NAME="pod1", ZONE="us-central2-b", BUCKET="gs://bkt", RUN="r1", LAUNCH_ID="L7")


def _tpu_steps(fake_bin, *args: str) -> tuple[list[str], list[str]]:
    """(command lines, '#' hint lines) of a tpu_pod.sh dry run."""
    lines = _dry("tpu_pod.sh", "--dry-run", *args, env=_env(fake_bin[0], **TPU_ENV))
    assert not fake_bin[1].exists()  # a dry run calls no gcloud
    return [l for l in lines if not l.startswith("#")], [l for l in lines if l.startswith("#")]


def _remote(line: str) -> str:
    words = shlex.split(line)
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in words
    return words[words.index("--command") + 1]


def _step(lines: list[str], marker: str) -> int:
    (i,) = [i for i, l in enumerate(lines) if marker in l]
    return i


def test_tpu_dry_run_installs_kills_stale_starts_detached_and_passes_overrides(fake_bin):
    user = ["run", "--config", "configs/alexnet_imagenet.py:w2a2", *USER]
    lines, hints = _tpu_steps(fake_bin, "--", *user)
    install, stop = _step(lines, "setup.sh"), _step(lines, "lsof")
    start, mount = _step(lines, "bnfree_jax.cli --distributed"), _step(lines, "gcsfuse")
    assert stop < install < mount < start  # stale processes go first, the job last
    assert "bash ~/bnfree/launch/setup.sh --accelerator tpu ~/bnfree/.venv" in _remote(lines[install])
    assert not any("pip install" in l for l in lines)  # no system pip (the image's Python 3.10)

    kill = _remote(lines[stop])
    assert "sudo lsof -t /dev/accel* /dev/vfio/*" in kill and "sudo kill -9" in kill
    assert "pkill -TERM -f '[b]nfree_jax[.]cli'" in kill and "rm -f /tmp/libtpu_lockfile" in kill
    assert "bnfree_jax.cli" not in kill  # its own shell must not match its pkill patterns

    remote = _remote(lines[start])
    words = shlex.split(remote)
    assert "setsid nohup bash launch/tpu_pod.sh --supervise" in remote  # detached, supervised
    exit_dir = "/tmp/gcs/bnfree/launches/r1/L7"  # in the shared bucket: every worker sees it
    assert words[words.index("--supervise") + 1:words.index("--supervise") + 4] == ["$w", exit_dir, "--"]
    assert ">> ~/bnfree/logs/worker-$w.log 2>&1 < /dev/null &" in remote  # one log per worker
    assert "agent-worker-number" in remote
    py = words.index("bnfree_jax.cli") - 2
    assert words[py:py + 3] == ["~/bnfree/.venv/bin/python", "-m", "bnfree_jax.cli"]
    assert _bnfree_args(words)[:len(user)] == user  # verbatim, the launcher's words after them
    parsed = _accepted(words)
    assert parsed.command == "run" and parsed.workdir == "gs://bkt/bnfree/r1"  # the bucket itself
    assert parsed.overrides == [*USER, "data.data_dir=gs://bkt/tensorflow_datasets"]
    assert any("tail -f ~/bnfree/logs/worker-0.log" in h and "--worker=0" in h for h in hints)


def test_tpu_keeps_the_users_data_dir_and_refuses_a_workdir(fake_bin):
    lines, _ = _tpu_steps(fake_bin, "--", "run", "data.data_dir=/tmp/gcs/mine")
    parsed = _accepted(shlex.split(_remote(lines[_step(lines, "bnfree_jax.cli --distributed")])))
    assert parsed.overrides == ["data.data_dir=/tmp/gcs/mine"]
    res = _script("tpu_pod.sh", "--dry-run", "--", "run", "--workdir", "/x", env=_env(fake_bin[0], **TPU_ENV))
    assert res.returncode == 2 and "--workdir" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_tpu_skip_setup_and_stop(fake_bin):
    lines, _ = _tpu_steps(fake_bin, "--skip-setup", "--", "run")
    assert not any("setup.sh" in l or "tpu-vm scp" in l for l in lines)
    assert any("lsof" in l for l in lines) and any("--supervise" in l for l in lines)
    (line,) = _dry("tpu_pod.sh", "--dry-run", "--stop", env=_env(fake_bin[0], **TPU_ENV))
    assert "lsof -t /dev/accel*" in _remote(line)


@pytest.fixture
def supervise(fake_bin, tmp_path):
    """Start `tpu_pod.sh --supervise WORKER DIR -- COMMAND` here (DIR: the exit files' folder)."""
    exits = tmp_path / "exits"
    exits.mkdir()

    def start(worker: str, *command: str, grace: int = 5) -> subprocess.Popen:
        env = _env(fake_bin[0], BNFREE_POLL="0.1", BNFREE_GRACE=str(grace))
        return subprocess.Popen(["bash", str(LAUNCH / "tpu_pod.sh"), "--supervise", worker, str(exits), "--",
                                 *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    yield start, exits
    assert not fake_bin[1].exists()  # the supervisor calls no gcloud


def test_supervisor_stops_its_worker_when_a_peer_fails(supervise):
    start, exits = supervise
    (exits / "worker-2.exit").write_text("0\n")  # a peer that finished well: no reason to stop
    proc = start("1", "sleep", "30")
    time.sleep(1.0)
    assert proc.poll() is None
    t0 = time.monotonic()
    (exits / "worker-0.exit").write_text("3\n")
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 128 + signal.SIGTERM
    assert "worker 0 exited with status 3; stopping worker 1" in err
    assert (exits / "worker-1.exit").read_text().strip() == str(128 + signal.SIGTERM)


def test_supervisor_publishes_its_workers_status(supervise):
    start, exits = supervise
    proc = start("0", "sh", "-c", "exit 5")
    proc.communicate(timeout=20)
    assert proc.returncode == 5 and (exits / "worker-0.exit").read_text().strip() == "5"
    (exits / "worker-0.exit").unlink()
    proc = start("3", "true")
    proc.communicate(timeout=20)
    assert (exits / "worker-3.exit").read_text().strip() == "0"


def test_supervisor_kills_a_worker_that_ignores_sigterm(supervise):
    start, exits = supervise
    proc = start("1", sys.executable, "-c",
                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)", grace=1)
    time.sleep(1.5)  # python has set its handler
    (exits / "worker-0.exit").write_text("1\n")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGKILL and "SIGKILL" in err


# ---- slurm_gpu.sbatch ----

def test_slurm_dry_run_port_from_job_id_requeue_and_cuda_install(fake_bin, tmp_path):
    args = ["run", "--config", CONFIG, USER[0], "--workdir", "/shared/j", USER[1], USER[2]]
    venv = tmp_path / "no_venv"
    lines = _dry("slurm_gpu.sbatch", "--dry-run", "--", *args,
                 env=_env(fake_bin[0], SLURM_JOB_ID="123456", VENV=str(venv)))
    assert not fake_bin[1].exists()
    commands = [shlex.split(l) for l in lines if not l.startswith("#")]
    assert commands[0] == ["bash", str(ROOT / "launch" / "setup.sh"), "--accelerator", "cuda", str(venv)]
    srun = commands[1]
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
    assert "--export=ALL,BNFREE_PORT=15456" in srun  # 12000 + 123456 % 20000
    assert srun[srun.index("-m") - 1] == str(venv / "bin" / "python")
    assert _bnfree_args(srun) == args and _accepted(srun).overrides == USER
    assert commands[2] == ["scontrol", "requeue", "123456"]
    header = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --requeue\n" in header and "#SBATCH --signal=B:USR1@" in header
    # Another job gets another port; BNFREE_PORT, when set, wins; PYTHON set: nothing to install.
    lines = _dry("slurm_gpu.sbatch", "--dry-run", "--", *args,
                 env=_env(fake_bin[0], SLURM_JOB_ID="123457", PYTHON="python3"))
    assert len([l for l in lines if not l.startswith("#")]) == 2
    assert "BNFREE_PORT=15457" in lines[1]
    lines = _dry("slurm_gpu.sbatch", "--dry-run", "--", *args,
                 env=_env(fake_bin[0], SLURM_JOB_ID="123457", PYTHON="python3", BNFREE_PORT="2222"))
    assert "BNFREE_PORT=2222" in lines[1]


def test_slurm_requeues_on_usr1_after_stopping_the_step(fake_bin):
    bin_dir, calls = fake_bin
    env = _env(bin_dir, SLURM_JOB_ID="4242", PYTHON="python3")
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--", "run", "--workdir", "/s/j", "a=1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (calls.exists() and "srun" in calls.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    log = calls.read_text().splitlines()
    assert log[0].startswith("srun BNFREE_PORT=16242 ") and log[0].endswith("--distributed run --workdir /s/j a=1")
    assert log[1:] == ["srun got TERM", "scontrol requeue 4242"]  # the step stops first, then the requeue


def test_slurm_failure_is_not_requeued(fake_bin):
    bin_dir, calls = fake_bin
    res = _script("slurm_gpu.sbatch", "--", "run", "--workdir", "/s/j",
                  env=_env(bin_dir, SLURM_JOB_ID="4242", PYTHON="python3", FAKE_SRUN_EXIT="3"))
    assert res.returncode == 3
    assert "scontrol" not in calls.read_text()


def test_tpu_start_command_run_by_a_workers_shell(fake_bin, tmp_path):
    """The start step's remote command, run here by bash as a worker's shell would: it returns
    at once, the job runs detached under its supervisor, the bnfree words arrive intact (the
    quoted override too), the log is the worker's, and its exit status reaches the bucket."""
    bin_dir, calls = fake_bin
    (bin_dir / "curl").write_text("#!/bin/sh\necho 2\n")  # the metadata server: worker 2
    (bin_dir / "curl").chmod(0o755)
    home = tmp_path / "home"
    (home / "bnfree" / ".venv" / "bin").mkdir(parents=True)
    (home / "bnfree" / "launch").symlink_to(LAUNCH)
    py = home / "bnfree" / ".venv" / "bin" / "python"  # records what the worker's python is given
    py.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\necho "tpu=$BNFREE_TPU"\nexit 4\n')
    py.chmod(0o755)
    user = ["run", "--config", "configs/alexnet_imagenet.py", *USER]
    env = _env(bin_dir, **TPU_ENV, MOUNT=str(tmp_path / "gcs"), BNFREE_POLL="0.1")
    lines = [l for l in _dry("tpu_pod.sh", "--dry-run", "--skip-setup", "--", *user, env=env)
             if not l.startswith("#")]
    remote = _remote(lines[_step(lines, "bnfree_jax.cli --distributed")])
    t0 = time.monotonic()
    res = subprocess.run(["bash", "-c", remote], env={**env, "HOME": str(home)},
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "worker 2: started" in res.stdout, res.stderr
    exit_file = tmp_path / "gcs" / "bnfree" / "launches" / "r1" / "L7" / "worker-2.exit"
    while not exit_file.exists():
        assert time.monotonic() - t0 < 20
        time.sleep(0.05)
    assert exit_file.read_text().strip() == "4"
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:3] == ["-m", "bnfree_jax.cli", "--distributed"]
    assert argv[3:3 + len(user)] == user
    parsed = cli.parse_args(argv[3:])
    assert parsed.overrides[:len(USER)] == USER and parsed.workdir == "gs://bkt/bnfree/r1"
    log = (home / "bnfree" / "logs" / "worker-2.log").read_text()
    assert "tpu=1" in log and "[supervisor] worker 2" in log and "exit status 4" in log
    assert not calls.exists()
