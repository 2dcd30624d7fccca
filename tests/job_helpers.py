"""Running `bnfree` as a user does, for the end-to-end tests: one tiny job definition shared
by every test that needs a finished job (see conftest.py's `tiny_job`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/mnist_alexnet.py:quick"
# tiny_cnn, 1,024 training images; the last two layers converted together (a head stage)
TINY = ["model.name='tiny_cnn'", "data.max_train_examples=1024", "data.max_test_examples=512",
        "data.eval_batch=256", "teacher.batch=32", "qat.batch=32", "ptl.batch=32",
        "teacher.steps=40", "qat.steps=20", "ptl.local_init_steps=5", "ptl.stage_steps=12",
        "ptl.finetune_steps=10", "ptl.head_layers=2", "checkpoint.save_every=4",
        "checkpoint.grad_diagnostics=False"]  # on in the plug-in job (test_plugins), which checks them
STAGES = ["local_init", "stage1_conv1", "stage2_conv2-fc3", "finetune"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def bnfree(*args, env_extra=None, **kw):
    kw.setdefault("cwd", ROOT)
    return subprocess.run([sys.executable, "-m", "bnfree_jax.cli", *args],
                          env={**env(), **(env_extra or {})}, capture_output=True, text=True, **kw)


def start(*args, **kw) -> subprocess.Popen:
    """`bnfree ARGS` in the background, its stderr kept in a pipe."""
    return subprocess.Popen([sys.executable, "-m", "bnfree_jax.cli", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def run_args(workdir) -> list[str]:
    return ["run", "--config", CONFIG, "--workdir", str(workdir), *TINY]


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def artifact_sha(workdir: Path) -> str:
    return hashlib.sha256((Path(workdir) / "export" / "model.safetensors").read_bytes()).hexdigest()
