"""The deep plain network (`vgg_plain`: 12 3×3 convs + 2 dense, no residuals) on the
embedded MNIST, where BN-free end-to-end training loses to BN (docs/results.md, "Where
BatchNorm matters"). Measured (seed 0, `holdout`, the 2 cores shared by 2–4 jobs, so
these are upper bounds): float BN teacher 1,200 steps 2,442 s (99.50 % held-out), W4A4
QAT 600 steps ~660 s (99.41 %), PTL 1,844 s (60 + 14 × 150 + 600 steps at batch 64),
export and verification 106 s: one job about 85 minutes under that load; at the quiet
rates seen (QAT 1.1 step/s) an estimated ~45 minutes (not measured quiet). Those were
an Intel Xeon host's; on an AMD EPYC 2-core host (2026-12-02) the one-device teacher
step took 3.75 s even quiet, 1.8× the loaded Xeon's 2.04 s. On a CPU host add
`mesh.cpu_devices=8`: the teacher step then runs 2.5× faster (bench/scaling_cpu.py
--model vgg_plain; docs/scale-out.md). The budgets are the alexnet_mini ones scaled to
the depth: 12 convs because the BN-free penalty in float training from scratch grows
with depth (0.07 points at 3 convs, 0.25 at 6, 0.44 at 12, n = 3 each;
bench/bn_free_scratch.py).

Arguments as configs/mnist_alexnet.py (`quick`, `wXaY`, `channel`) plus `holdout` (train on
the first 50,000 images and evaluate on the last 10,000, for choices); `bnfree sweep` with
this config runs PTL and every baseline at W4A4 and W2A2 under requant="layer", 3 seeds
(`seeds=N` to change).
"""

from pathlib import Path

import ml_collections

from bnfree_jax.config_io import config_of_file


def _base(arg: str):
    """configs/mnist_alexnet.py's config for `arg`."""
    return config_of_file(Path(__file__).with_name("mnist_alexnet.py"), arg)


def get_config(arg: str = ""):
    args = [a.strip() for a in (arg or "").split(",") if a.strip()]
    own = [a for a in args if a == "holdout" or a.startswith("seeds=")]
    c = _base(",".join(a for a in args if a not in own))
    c.model.name = "vgg_plain"
    if "quick" not in args:
        c.teacher.steps, c.qat.steps = 1200, 600
        c.ptl.local_init_steps, c.ptl.stage_steps, c.ptl.finetune_steps = 60, 150, 600
    c.sweep = ml_collections.ConfigDict(dict(
        bits=["w4a4", "w2a2"], requant=["layer"], seeds=[0, 1, 2],
        baselines=["fold", "fold_qat", "scratch", "no_local", "no_comp"],
        ptl="first",  # PTL's row before the baselines' ("last", or "skip" for baselines only)
        binary_qat_steps=c.qat.steps, binary_qat_lr=c.qat.optim.lr))
    for a in own:
        if a == "holdout":
            c.data.holdout = 10000
        else:
            c.sweep.seeds = list(range(int(a.split("=")[1])))
    return c
