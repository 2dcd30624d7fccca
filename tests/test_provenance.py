"""Every finished phase records the code that made it: the checkout's commit, never that
of an unrelated repository around an installed copy."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax

from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.provenance import code_revision

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import json; from bnfree_jax.pipeline.provenance import code_revision; print(json.dumps(code_revision()))"


def git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def revision_of_copy(pkg_root: Path) -> dict:
    """code_revision() of a copy of the package placed at pkg_root/bnfree_jax."""
    shutil.copytree(ROOT / "bnfree_jax", pkg_root / "bnfree_jax", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=pkg_root, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pkg_root)}, check=True).stdout
    return json.loads(out)


def test_the_checkouts_commit():
    rev = code_revision()
    assert rev["commit"] == git(ROOT, "rev-parse", "HEAD")
    assert rev["dirty"] == bool(git(ROOT, "status", "--porcelain", "--untracked-files=no"))


def test_a_copy_in_a_fresh_repository_names_its_commit_and_dirt(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    rev0 = revision_of_copy(root)
    assert rev0["commit"] is None  # no commit yet: git rev-parse HEAD fails
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    rev = json.loads(subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True,
                                    env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, check=True).stdout)
    assert rev == {"commit": git(root, "rev-parse", "HEAD"), "dirty": False}
    (root / "bnfree_jax" / "__init__.py").write_text('"""changed"""\n')
    rev = json.loads(subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True,
                                    env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, check=True).stdout)
    assert rev["dirty"] is True


def test_a_copy_inside_an_unrelated_repository_claims_no_commit(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "other.txt").write_text("x")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "other")
    rev = revision_of_copy(tmp_path / "site-packages")
    assert rev["commit"] is None and "version" in rev


def test_the_ledger_records_the_code_of_each_phase_and_keeps_a_copied_ones(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.mark_done("teacher", top1=0.9)
    ledger.mark_done("qat", top1=0.8, code={"commit": "abc", "dirty": False})  # as a shared teacher's record
    saved = json.loads((tmp_path / "phases.json").read_text())
    assert saved["teacher"]["code"] == code_revision() and saved["teacher"]["top1"] == 0.9
    assert saved["teacher"]["layout"] == {"platform": "cpu", "devices": len(jax.devices()), "processes": 1}
    assert saved["qat"]["code"] == {"commit": "abc", "dirty": False}


def test_a_shared_teacher_keeps_its_own_code_or_none(tmp_path):
    """The sweep's copied float teacher names the code that trained it, not the copier's;
    one from before code was recorded names none."""
    from bnfree_jax.pipeline.sweep import _share_teacher

    for i, code in enumerate(({"commit": "abc", "dirty": False}, None)):
        src, dst = tmp_path / f"src{i}", tmp_path / f"dst{i}"
        (src / "teacher" / "variables").mkdir(parents=True)
        (src / "teacher" / "variables" / "x").write_text("v")
        data = {"teacher": {"done": True, "top1": 0.9, **({"code": code} if code else {})}}
        (src / "phases.json").write_text(json.dumps(data))
        _share_teacher(src, dst)
        rec = json.loads((dst / "phases.json").read_text())["teacher"]
        assert rec["code"] == code and rec["top1"] == 0.9
        assert (dst / "teacher" / "variables" / "x").read_text() == "v"

